"""How the feedback package installs: its third-party imports are declared in the [feedback]
extra, the console script exists, and the client a trainer imports loads no dependency (it
runs on the light install)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import packages_distributions

from tests.feedback.servers import ROOT
from tests.test_install import _declared, _name, _project, _third_party_imports


def test_every_third_party_import_of_feedback_is_in_its_extra():
    project, dists = _project(), packages_distributions()
    allowed = _declared(project, ("feedback",))
    missing = {m: where for m, where in _third_party_imports("feedback").items()
               if m != "feedback" and not {_name(d) for d in dists.get(m, [m])} & allowed}
    assert not missing, f"feedback imports {missing}, not declared in [feedback]"
    assert "rlhf-rm-service[feedback]" in project["optional-dependencies"]["all"]
    assert project["scripts"]["feedback-server"] == "feedback.cli:main"
    assert "selenium" in {_name(r) for r in project["optional-dependencies"]["dev"]}


def test_the_client_loads_no_dependency():
    code = ("import sys, feedback.client, feedback.sender; "
            "heavy = {'aiohttp', 'psycopg', 'prometheus_client', 'tyro', 'yaml', 'grpc', "
            "'torch'} & {m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
