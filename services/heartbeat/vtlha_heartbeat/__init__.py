"""vtl-ha."""
