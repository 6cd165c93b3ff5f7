"""The ip-manager imports pyroute2 without its eager package ``__init__`` (the ~130
modules it loads put the service over 60 MB of RSS), and the package still answers every
name its ``__init__`` defines once asked. Each check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_the_ip_manager_loads_only_what_it_uses() -> None:
    got = _run("import sys, vtlha_ip_manager.main, vtlha_ip_manager.garp; "
               "print('pyroute2.ndb' in sys.modules, 'pyroute2.ipset' in sys.modules, "
               "'pyroute2.iproute.linux' in sys.modules, 'pyroute2.netns' in sys.modules)")
    assert got == "False False True True"


def test_the_package_still_answers_its_own_names() -> None:
    got = _run("import sys, vtlha_ip_manager.main\n"
               "from pyroute2 import IPRoute, AsyncIPRoute, netns\n"
               "import pyroute2\n"
               "print(IPRoute.__name__, AsyncIPRoute.__module__, netns.__name__, "
               "'pyroute2.ndb' in sys.modules)")
    assert got == "IPRoute pyroute2.iproute.linux pyroute2.netns True"


def test_a_name_the_package_does_not_have_is_an_import_error() -> None:
    with pytest.raises(subprocess.CalledProcessError) as e:
        _run("import vtlha_ip_manager.main\nfrom pyroute2 import NoSuchThing")
    assert "ImportError" in e.value.stderr and "NoSuchThing" in e.value.stderr
