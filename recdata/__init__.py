"""Data shared by every recfunnel stage: data sets, the time split, metrics and model bundles."""
