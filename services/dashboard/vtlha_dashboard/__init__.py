"""The live web dashboard of a vtl-ha cluster (``vtlha-dashboard``)."""
