"""benchmarks.servers: what the local servers cost a benchmark run on the same cores."""

from __future__ import annotations

import pytest

from benchmarks.servers import _server_name, server_cpu_seconds


def test_each_server_is_known_by_its_command_line():
    assert _server_name(["/venv/bin/weed", "-logtostderr", "server", "-dir=/tmp/x"]) == "seaweedfs"
    assert _server_name(["/venv/bin/python3.11", "/venv/bin/prefect", "server", "start", "--port", "1"]) == "prefect server"
    assert _server_name(["/venv/bin/python3.11", "/venv/bin/moto_server", "-H", "127.0.0.1"]) == "moto"
    assert _server_name(["/venv/bin/python3.11", "/venv/bin/prefect", "worker", "start", "--pool", "server"]) is None
    assert _server_name(["/usr/bin/python3", "-m", "pytest"]) is None


@pytest.mark.integration
def test_the_s3_servers_cpu_grows_with_the_requests_it_serves(seaweedfs_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=seaweedfs_endpoint, skip_instance_cache=True)
    fs.mkdir("cpu-probe")
    before = server_cpu_seconds()
    for index in range(100):
        fs.pipe(f"cpu-probe/object-{index}", bytes(2000))
    after = server_cpu_seconds()
    assert set(after) == {"prefect server", "seaweedfs", "moto"}
    assert after["seaweedfs"] > before["seaweedfs"] > 0
    fs.rm("cpu-probe", recursive=True)
