"""Fixtures starting real L3 servers (l3_servers.py); their tests skip, saying what to install, where
a server binary or package is absent."""

from __future__ import annotations

import pytest

from l3_servers import REDIS_SERVER, MooncakeStoreServers, RedisServer, RedisServers, require_mooncake


@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs the Debian package redis-server)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis_servers(tmp_path):
    """Two redis-servers (a store spread over them: redis://HOST:PORT,HOST:PORT)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs the Debian package redis-server)")
    servers = RedisServers(tmp_path, 2).start()
    yield servers.servers
    servers.stop()


def _mooncake(tmp_path_factory):
    require_mooncake()
    servers = MooncakeStoreServers(tmp_path_factory.mktemp("mooncake"))
    try:
        servers.start()
    except BaseException:
        servers.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def mooncake_servers(tmp_path_factory):
    servers = _mooncake(tmp_path_factory)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def mooncake_servers_shm(tmp_path_factory):
    """A store of its own for the shared-memory client (the tests reuse page keys across backends)."""
    servers = _mooncake(tmp_path_factory)
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def mooncake_servers_x2(tmp_path_factory):
    """Two Mooncake Stores, a master and a store process each (a store spread over them by key)."""
    pair = []
    try:
        for _ in range(2):
            pair.append(_mooncake(tmp_path_factory))
        yield pair
    finally:
        for servers in pair:
            servers.stop()
