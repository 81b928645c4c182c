"""The test suite mirrors the source tree (tests/trainer/ tests trainer/, ...). Every folder is a package, so that
test modules of one name in two folders import as distinct modules and shared helpers are imported by their full
name (``from tests.harness.small_tasks import TinyTask``)."""
