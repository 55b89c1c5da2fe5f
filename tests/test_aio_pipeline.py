"""Issue 16 in precog_db.aio only: the connection class the deferred BEGIN needs.

The scenarios both layers share are in tests/test_pipeline_common_async.py; a
cancelled committed or pipelined block in tests/test_cancellation_common_async.py.
"""

from __future__ import annotations

import psycopg
import pytest

from precog_db import ConfigurationError, aio
from precog_db.settings import DatabaseSettings

pytestmark = pytest.mark.asyncio


class TestConnectionClass:
    async def test_plain_connection_class_refused(self, test_settings: DatabaseSettings) -> None:
        """The deferred BEGIN lives in AsyncPrecogConnection.wait: a plain class is refused, with what to do."""
        with pytest.raises(ConfigurationError, match=r"subclass of precog_db\.aio\.AsyncPrecogConnection"):
            await aio.initialize_pool(settings=test_settings, connection_class=psycopg.AsyncConnection)
