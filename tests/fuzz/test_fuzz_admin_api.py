"""The admin API against its own OpenAPI document, with schemathesis.

Every operation gets generated requests, valid and not: none may answer a server error
(5xx) or a body that is not the JSON its document promises.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from identity.admin_api import create_admin_app
from meshward.config import load_config
from meshward.runtime import build_identity_server
from tests.conftest import FakeClock

_DATA = Path(tempfile.mkdtemp(prefix="meshward-fuzz-admin-"))
atexit.register(shutil.rmtree, _DATA, ignore_errors=True)
_SERVER = build_identity_server(
    load_config(None, env={}, flags={"trust_domain": "example.org", "data_dir": _DATA / "data"}),
    clock=FakeClock(datetime.now(UTC).replace(microsecond=0)),
)
atexit.register(_SERVER.db.dispose)
atexit.register(_SERVER.ca.close)
APP = create_admin_app(_SERVER.admin, registry=_SERVER.registry, ready=_SERVER.ready)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
def test_admin_api(case: schemathesis.Case) -> None:
    case.call_and_validate(
        checks=[not_a_server_error, content_type_conformance, response_schema_conformance]
    )
