"""Example applications built on the cluster (not installed with the package)."""
