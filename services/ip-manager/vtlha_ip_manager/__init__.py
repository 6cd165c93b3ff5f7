"""vtl-ha."""

from vtlha_ip_manager import lazypyroute2

lazypyroute2.install()  # before any pyroute2 import of this package
