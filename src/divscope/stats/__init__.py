"""Statistics on results: ``analysis`` (persona matrices against cosine and leakage: Mantel,
dependent correlations, redundancy, KL asymmetry) and ``categories`` (means with bootstrap CIs
per category)."""
