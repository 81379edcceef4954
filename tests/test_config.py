"""Configuration parsing: every key, every default, every kind of problem."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from stickyproxy.config import (
    AdminConfig,
    BalanceConfig,
    Config,
    CookieConfig,
    DemoConfig,
    EngineIOConfig,
    HealthConfig,
    ProxyConfig,
    ServerConfig,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from stickyproxy.errors import ConfigError, ConfigProblem

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ONE_SERVER = "[server s1]\naddress = 10.0.0.1:3030\n"


def problems_of(text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.problems


def only_problem(text: str) -> ConfigProblem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def with_key(section: str, key: str, value: str) -> str:
    """One server plus ``key = value`` in ``section``."""
    if section == "server":
        return f"{ONE_SERVER}{key} = {value}\n"
    return f"{ONE_SERVER}[{section}]\n{key} = {value}\n"


def value_of(config: Config, section: str, attribute: str) -> Any:
    holder = config.servers[0] if section == "server" else getattr(config, section)
    return getattr(holder, attribute)


# --- the shipped example files ---------------------------------------------


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.ini")), ids=lambda p: p.name)
def test_every_shipped_example_parses(path: Path) -> None:
    assert load_config(str(path)).servers


def test_shipped_examples_exist() -> None:
    names = {path.name for path in CONF_DIR.glob("*.ini")}
    assert {"stickyproxy.ini", "demo.ini"} <= names


def test_production_example_is_the_seed_haproxy_setup() -> None:
    config = load_config(str(CONF_DIR / "stickyproxy.ini"))
    assert config.proxy.listen == ("tcp:3030",)
    assert config.proxy.proxy_protocol == "required"
    assert config.proxy.maxconn == 1000
    assert config.cookie.name == "storify_editor_host"
    assert (config.cookie.mode, config.cookie.indirect, config.cookie.nocache) == (
        "insert",
        True,
        True,
    )
    assert config.health == HealthConfig(
        path="/status?all=1", interval=10.0, timeout=5.0, rise=1, fall=3
    )
    assert config.servers == (
        ServerConfig("s1", "storifyeditor1.prod.livefyre.com", 3030, "s1", 10, 1000),
        ServerConfig("s2", "storifyeditor2.prod.livefyre.com", 3030, "s2", 10, 1000),
    )


def test_production_example_sets_every_key_of_every_section() -> None:
    text = (CONF_DIR / "stickyproxy.ini").read_text()
    for section, dataclass_ in [
        ("proxy", ProxyConfig),
        ("cookie", CookieConfig),
        ("health", HealthConfig),
        ("admin", AdminConfig),
        ("demo", DemoConfig),
        ("engineio", EngineIOConfig),
    ]:
        body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
        keys = {line.split("=")[0].strip() for line in body.splitlines() if "=" in line}
        keys = {key for key in keys if not key.startswith(";")}
        assert set(dataclass_.__slots__) <= keys, section  # type: ignore[attr-defined]


def test_demo_example_runs_three_loopback_backends_without_proxy_protocol() -> None:
    config = load_config(str(CONF_DIR / "demo.ini"))
    assert config.demo.backends is True
    assert config.proxy.proxy_protocol == "off"
    assert config.proxy.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.admin.listen == "tcp:8090:interface=127.0.0.1"
    assert config.health.interval == 2.0
    assert [(s.name, s.host, s.port) for s in config.servers] == [
        ("s1", "127.0.0.1", 8081),
        ("s2", "127.0.0.1", 8082),
        ("s3", "127.0.0.1", 8083),
    ]


# --- defaults ----------------------------------------------------------------


def test_a_single_server_is_a_whole_configuration_with_every_default() -> None:
    assert parse_config(ONE_SERVER) == Config(
        servers=(ServerConfig("s1", "10.0.0.1", 3030, "s1"),),
        proxy=ProxyConfig(),
        cookie=CookieConfig(),
        balance=BalanceConfig(),
        health=HealthConfig(),
        admin=AdminConfig(),
        demo=DemoConfig(),
    )


def test_defaults_follow_the_configuration_contract() -> None:
    config = parse_config(ONE_SERVER)
    assert config.proxy.listen == ("tcp:3030",)
    assert config.proxy.proxy_protocol == "required"
    assert config.proxy.trusted_proxies == ()
    assert (config.proxy.timeout_connect, config.proxy.timeout_tunnel) == (5.0, 3600.0)
    assert (config.proxy.max_head_size, config.proxy.max_headers) == (15360, 100)
    assert config.cookie.name == "storify_editor_host"
    assert (config.cookie.samesite, config.cookie.max_age, config.cookie.path) == ("", None, "/")
    assert config.balance.hash_key == "source"
    assert config.balance.hash_key_name is None
    assert config.servers[0].check is True
    assert (config.health.fastinter, config.health.downinter) == (None, None)
    assert config.health.expect_status == ((200, 399),)
    assert (config.health.host, config.health.http_version) == (None, "1.1")
    assert config.health.observe == "layer4"
    assert config.admin.listen is None
    assert config.demo.backends is False


def test_empty_sections_keep_every_default() -> None:
    text = "[proxy]\n[cookie]\n[balance]\n[health]\n[admin]\n[demo]\n" + ONE_SERVER
    assert parse_config(text) == parse_config(ONE_SERVER)


def test_keep_alive_timeout_defaults_to_the_request_timeout() -> None:
    config = parse_config(with_key("proxy", "timeout_http_request", "3s"))
    assert config.proxy.timeout_http_keep_alive == 3.0


def test_keep_alive_timeout_may_be_set_on_its_own() -> None:
    text = ONE_SERVER + "[proxy]\ntimeout_http_request = 3s\ntimeout_http_keep_alive = 1m\n"
    config = parse_config(text)
    assert (config.proxy.timeout_http_request, config.proxy.timeout_http_keep_alive) == (3, 60)


def test_server_cookie_defaults_to_the_section_name() -> None:
    config = parse_config("[server web-1.a_b]\naddress = h:1\n")
    assert config.servers[0].name == "web-1.a_b"
    assert config.servers[0].cookie == "web-1.a_b"


def test_servers_keep_the_order_of_the_file() -> None:
    text = "[server b]\naddress = h:2\n[server a]\naddress = h:1\n[server c]\naddress = h:3\n"
    assert [s.name for s in parse_config(text).servers] == ["b", "a", "c"]


# --- every key ---------------------------------------------------------------

VALID = [
    ("proxy", "listen", "tcp:3030", "listen", ("tcp:3030",)),
    (
        "proxy",
        "listen",
        "tcp:3030:interface=10.0.0.1, tcp6:3030:interface=\\:\\:1",
        "listen",
        ("tcp:3030:interface=10.0.0.1", "tcp6:3030:interface=\\:\\:1"),
    ),
    ("proxy", "listen", "unix:/run/sp.sock", "listen", ("unix:/run/sp.sock",)),
    ("proxy", "listen", "systemd:domain=INET:index=0", "listen", ("systemd:domain=INET:index=0",)),
    ("proxy", "listen", "ssl:443:privateKey=k.pem", "listen", ("ssl:443:privateKey=k.pem",)),
    ("proxy", "listen", "tcp:port=0", "listen", ("tcp:port=0",)),
    ("proxy", "proxy_protocol", "optional", "proxy_protocol", "optional"),
    ("proxy", "proxy_protocol", "off", "proxy_protocol", "off"),
    ("proxy", "trusted_proxies", "", "trusted_proxies", ()),
    (
        "proxy",
        "trusted_proxies",
        "10.0.0.0/8, 192.168.1.7 fd00::/8",
        "trusted_proxies",
        (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.7/32"),
            ipaddress.ip_network("fd00::/8"),
        ),
    ),
    ("proxy", "maxconn", "1", "maxconn", 1),
    ("proxy", "timeout_connect", "500ms", "timeout_connect", 0.5),
    ("proxy", "timeout_http_request", "2s", "timeout_http_request", 2.0),
    ("proxy", "timeout_http_keep_alive", "1.5s", "timeout_http_keep_alive", 1.5),
    ("proxy", "timeout_client", "5m", "timeout_client", 300.0),
    ("proxy", "timeout_server", "90s", "timeout_server", 90.0),
    ("proxy", "timeout_tunnel", "2h", "timeout_tunnel", 7200.0),
    ("proxy", "retries", "0", "retries", 0),
    ("proxy", "redispatch", "no", "redispatch", False),
    ("proxy", "forwarded_for", "off", "forwarded_for", False),
    ("proxy", "max_head_size", "8k", "max_head_size", 8192),
    ("proxy", "max_head_size", "4000", "max_head_size", 4000),
    ("proxy", "max_headers", "50", "max_headers", 50),
    ("cookie", "name", "SERVERID", "name", "SERVERID"),
    ("cookie", "mode", "insert", "mode", "insert"),
    ("cookie", "indirect", "false", "indirect", False),
    ("cookie", "nocache", "0", "nocache", False),
    ("cookie", "httponly", "yes", "httponly", True),
    ("cookie", "secure", "on", "secure", True),
    ("cookie", "samesite", "Lax", "samesite", "Lax"),
    ("cookie", "samesite", "strict", "samesite", "Strict"),
    ("cookie", "samesite", "", "samesite", ""),
    ("cookie", "max_age", "1h", "max_age", 3600.0),
    ("cookie", "max_age", "", "max_age", None),
    ("cookie", "domain", ".example.com", "domain", ".example.com"),
    ("cookie", "domain", "", "domain", None),
    ("cookie", "path", "/editor", "path", "/editor"),
    ("balance", "hash_balance_factor", "0", "hash_balance_factor", 0),
    ("balance", "hash_balance_factor", "125", "hash_balance_factor", 125),
    ("balance", "hash_function", "haproxy", "hash_function", "haproxy"),
    ("health", "path", "/healthz", "path", "/healthz"),
    ("health", "interval", "2s", "interval", 2.0),
    ("health", "timeout", "750ms", "timeout", 0.75),
    ("health", "rise", "2", "rise", 2),
    ("health", "fall", "5", "fall", 5),
    ("health", "fastinter", "2s", "fastinter", 2.0),
    ("health", "downinter", "1m", "downinter", 60.0),
    ("health", "fastinter", "", "fastinter", None),
    ("health", "downinter", "", "downinter", None),
    ("health", "expect_status", "200", "expect_status", ((200, 200),)),
    (
        "health",
        "expect_status",
        "200,204, 300-399",
        "expect_status",
        ((200, 200), (204, 204), (300, 399)),
    ),
    ("health", "expect_status", "100-599", "expect_status", ((100, 599),)),
    ("health", "host", "editor.example.com", "host", "editor.example.com"),
    ("health", "host", "editor:3030", "host", "editor:3030"),
    ("health", "host", "[::1]:3030", "host", "[::1]:3030"),
    ("health", "host", "", "host", None),
    ("health", "http_version", "1.0", "http_version", "1.0"),
    ("health", "http_version", "1.1", "http_version", "1.1"),
    ("health", "observe", "none", "observe", "none"),
    ("health", "observe", "layer4", "observe", "layer4"),
    ("admin", "listen", "tcp:9000:interface=127.0.0.1", "listen", "tcp:9000:interface=127.0.0.1"),
    ("admin", "listen", "", "listen", None),
    ("demo", "backends", "false", "backends", False),
    ("server", "cookie", "websrv1", "cookie", "websrv1"),
    ("server", "weight", "0", "weight", 0),
    ("server", "weight", "256", "weight", 256),
    ("server", "maxconn", "0", "maxconn", 0),
    ("server", "check", "false", "check", False),
]


@pytest.mark.parametrize(("section", "key", "text", "attribute", "expected"), VALID)
def test_each_key_parses_its_value(
    section: str, key: str, text: str, attribute: str, expected: object
) -> None:
    config = parse_config(with_key(section, key, text))
    assert value_of(config, section, attribute) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("source", ("source", None)),
        ("header:X-Session-Id", ("header", "x-session-id")),
        ("query:sid", ("query", "sid")),
    ],
)
def test_hash_key_is_split_into_kind_and_name(text: str, expected: tuple[str, str]) -> None:
    balance = parse_config(with_key("balance", "hash_key", text)).balance
    assert (balance.hash_key, balance.hash_key_name) == expected


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("editor1.example.com:3030", "editor1.example.com", 3030),
        ("10.1.2.3:1", "10.1.2.3", 1),
        ("localhost:65535", "localhost", 65535),
        ("[::1]:8080", "::1", 8080),
        ("[2001:db8::7]:443", "2001:db8::7", 443),
    ],
)
def test_server_address_is_host_and_port(text: str, host: str, port: int) -> None:
    server = parse_config(f"[server s1]\naddress = {text}\n").servers[0]
    assert (server.host, server.port) == (host, port)


@pytest.mark.parametrize("text", ["true", "True", "YES", "on", "1"])
def test_true_is_spelled_many_ways(text: str) -> None:
    assert parse_config(with_key("cookie", "secure", text)).cookie.secure is True


@pytest.mark.parametrize("text", ["false", "FALSE", "no", "Off", "0"])
def test_false_is_spelled_many_ways(text: str) -> None:
    assert parse_config(with_key("server", "check", text)).servers[0].check is False


def test_samesite_none_is_accepted_with_secure() -> None:
    config = parse_config(ONE_SERVER + "[cookie]\nsamesite = None\nsecure = true\n")
    assert config.cookie.samesite == "None"


def test_list_values_may_continue_on_indented_lines() -> None:
    text = ONE_SERVER + "[proxy]\ntrusted_proxies = 10.0.0.0/8,\n    172.16.0.0/12\n"
    assert len(parse_config(text).proxy.trusted_proxies) == 2


# --- INI syntax ----------------------------------------------------------------


def test_comments_start_with_semicolon_or_hash_after_whitespace() -> None:
    text = (
        "; a comment\n# another\n"
        "[server s1]   ; the first server\n"
        "address = h:1 ; inline\n"
        "cookie = a#b  # the hash inside the value is not a comment\n"
    )
    assert parse_config(text).servers[0].cookie == "a#b"


def test_percent_signs_are_not_interpolated() -> None:
    text = with_key("health", "path", "/status?x=%41%(name)s")
    assert parse_config(text).health.path == "/status?x=%41%(name)s"


def test_keys_are_case_sensitive() -> None:
    problem = only_problem(with_key("proxy", "Listen", "tcp:1"))
    assert (problem.section, problem.key) == ("proxy", "Listen")
    assert "did you mean 'listen'" in problem.message


def test_default_section_is_not_special() -> None:
    problem = only_problem("[DEFAULT]\nweight = 1\n" + ONE_SERVER)
    assert problem.section == "DEFAULT"
    assert "unknown section" in problem.message


def test_windows_line_endings_are_accepted() -> None:
    assert parse_config(ONE_SERVER.replace("\n", "\r\n")).servers[0].port == 3030


# --- bad values ------------------------------------------------------------------

INVALID = [
    ("proxy", "listen", "", "at least one endpoint"),
    ("proxy", "listen", "3030", "write tcp:3030"),
    ("proxy", "listen", "http:80", "expected an endpoint"),
    ("proxy", "listen", "tcp:3030,", "extra comma"),
    ("proxy", "listen", "tcp:interface=1.2.3.4", "needs a port"),
    ("proxy", "listen", "tcp:70000", "needs a port from 0 to 65535"),
    ("proxy", "listen", "ssl:443", "privateKey"),
    ("proxy", "listen", "unix:", "socket path"),
    ("proxy", "listen", "systemd:", "needs arguments"),
    ("proxy", "proxy_protocol", "yes", "expected required or optional or off"),
    ("proxy", "trusted_proxies", "10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("proxy", "trusted_proxies", "10.0.0.0/8, elb", "'elb' is not an address or CIDR"),
    ("proxy", "maxconn", "0", ">= 1"),
    ("proxy", "maxconn", "-5", ">= 1"),
    ("proxy", "maxconn", "1_000", ">= 1"),
    ("proxy", "timeout_connect", "5000", "5000ms"),
    ("proxy", "timeout_connect", "0s", "above zero"),
    ("proxy", "timeout_tunnel", "forever", "expected a duration"),
    ("proxy", "retries", "-1", ">= 0"),
    ("proxy", "redispatch", "maybe", "expected true or false"),
    ("proxy", "max_head_size", "16kb", "expected a size"),
    ("proxy", "max_head_size", "0", "above zero"),
    ("proxy", "max_headers", "0", ">= 1"),
    ("cookie", "name", "my cookie", "RFC 6265 token"),
    ("cookie", "name", "", "RFC 6265 token"),
    ("cookie", "mode", "rewrite", "not supported yet"),
    ("cookie", "mode", "prefix", "not supported yet"),
    ("cookie", "mode", "magic", "expected insert"),
    ("cookie", "samesite", "Loose", "expected Lax, Strict, None or nothing"),
    ("cookie", "max_age", "3600", "3600ms or 3600s"),
    ("cookie", "max_age", "1.5s", "whole number of seconds"),
    ("cookie", "max_age", "500ms", "whole number of seconds"),
    ("cookie", "domain", "exa mple.com", "expected a domain"),
    ("cookie", "path", "editor", "starting with /"),
    ("cookie", "path", "/a;b", "without ';'"),
    ("balance", "hash_key", "cookie", "expected source, header:NAME or query:NAME"),
    ("balance", "hash_key", "header:", "expected source, header:NAME or query:NAME"),
    ("balance", "hash_key", "header:X Y", "expected source, header:NAME or query:NAME"),
    ("balance", "hash_key", "query:a&b", "expected source, header:NAME or query:NAME"),
    ("balance", "hash_balance_factor", "50", "above 100"),
    ("balance", "hash_balance_factor", "100", "above 100"),
    ("balance", "hash_function", "sdbm", "expected default or haproxy"),
    ("health", "path", "status", "starting with /"),
    ("health", "path", "/status all", "no spaces"),
    ("health", "path", "/status#top", "starting with /"),
    ("health", "interval", "10000", "10000ms"),
    ("health", "interval", "0ms", "above zero"),
    ("health", "timeout", "0s", "above zero"),
    ("health", "rise", "0", ">= 1"),
    ("health", "fall", "0", ">= 1"),
    ("health", "fastinter", "0s", "above zero"),
    ("health", "fastinter", "2000", "2000ms"),
    ("health", "downinter", "0ms", "above zero"),
    ("health", "expect_status", "", "such as 200,204,300-399"),
    ("health", "expect_status", "2xx", "such as 200,204,300-399"),
    ("health", "expect_status", "200,,204", "such as 200,204,300-399"),
    ("health", "expect_status", "99", "from 100 to 599"),
    ("health", "expect_status", "600", "from 100 to 599"),
    ("health", "expect_status", "399-300", "ends before it starts"),
    ("health", "host", "editor example", "Host header value"),
    ("health", "host", "editor:port", "Host header value"),
    ("health", "host", "http://editor/", "Host header value"),
    ("health", "http_version", "2", "expected 1.1 or 1.0"),
    ("health", "http_version", "HTTP/1.1", "expected 1.1 or 1.0"),
    ("health", "observe", "layer7", "expected layer4 or none"),
    ("admin", "listen", "tcp:1,tcp:2", "one endpoint"),
    ("admin", "listen", "9000", "write tcp:9000"),
    ("demo", "backends", "sometimes", "expected true or false"),
    ("server", "cookie", "", "non-empty cookie value"),
    ("server", "cookie", "a;b", "non-empty cookie value"),
    ("server", "cookie", '"s1"', "non-empty cookie value"),
    ("server", "weight", "257", "from 0 to 256"),
    ("server", "weight", "-1", "from 0 to 256"),
    ("server", "maxconn", "-1", ">= 0"),
    ("server", "check", "sometimes", "expected true or false"),
]


@pytest.mark.parametrize(("section", "key", "text", "message"), INVALID)
def test_each_bad_value_is_reported_with_what_was_expected(
    section: str, key: str, text: str, message: str
) -> None:
    if section == "server":
        problem = only_problem(f"{ONE_SERVER}{key} = {text}\n")
        label = "server s1"
    else:
        problem = only_problem(with_key(section, key, text))
        label = section
    assert (problem.section, problem.key) == (label, key)
    assert message in problem.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected host:port"),
        ("editor1.example.com", "has no port"),
        ("editor1.example.com:", "from 1 to 65535"),
        ("h:0", "from 1 to 65535"),
        ("h:65536", "from 1 to 65535"),
        ("h:http", "from 1 to 65535"),
        ("::1:3030", "in brackets"),
        ("[::1]", "expected host:port"),
        ("[not-v6]:1", "is not an IPv6 address"),
        ("300.1.1.1:80", "is not a host name or IPv4 address"),
        ("bad_host!:80", "is not a host name or IPv4 address"),
    ],
)
def test_bad_server_addresses_are_reported(text: str, message: str) -> None:
    problem = only_problem(f"[server s1]\naddress = {text}\n")
    assert (problem.section, problem.key) == ("server s1", "address")
    assert message in problem.message


def test_samesite_none_without_secure_is_a_problem() -> None:
    problem = only_problem(with_key("cookie", "samesite", "None"))
    assert (problem.section, problem.key) == ("cookie", "samesite")
    assert "secure = true" in problem.message


# --- structural problems -----------------------------------------------------------


def test_unknown_key_suggests_the_nearest_key() -> None:
    problem = only_problem(with_key("proxy", "timout_client", "5s"))
    assert (problem.section, problem.key) == ("proxy", "timout_client")
    assert problem.message == "unknown key (did you mean 'timeout_client'?)"


def test_unknown_key_points_to_the_section_it_belongs_in() -> None:
    problem = only_problem(with_key("server", "inter", "10s"))
    assert problem.message == "unknown key here (did you mean 'interval' in [health]?)"


def test_unknown_key_without_a_near_match_says_only_that() -> None:
    assert only_problem(with_key("health", "zzz", "1")).message == "unknown key"


def test_unknown_section_suggests_the_nearest_section() -> None:
    problem = only_problem(ONE_SERVER + "[helth]\n")
    assert (problem.section, problem.key) == ("helth", None)
    assert problem.message == "unknown section (did you mean [health]?)"


def test_misspelt_server_section_suggests_server() -> None:
    problem = only_problem(ONE_SERVER + "[sever s2]\naddress = h:1\n")
    assert "did you mean [server s2]" in problem.message


def test_haproxy_sections_are_named_as_such() -> None:
    problem = only_problem(ONE_SERVER + "[backend storify_editor_backend]\n")
    assert "HAProxy" in problem.message
    assert "[server NAME]" in problem.message


@pytest.mark.parametrize(
    ("header", "message"), [("server", "needs a name"), ("server a/b", "may only use")]
)
def test_server_section_names_are_checked(header: str, message: str) -> None:
    problem = only_problem(f"{ONE_SERVER}[{header}]\naddress = h:1\n")
    assert (problem.section, problem.key) == (header, None)
    assert message in problem.message


def test_keys_of_a_badly_named_server_are_still_checked() -> None:
    problems = problems_of(f"{ONE_SERVER}[server a/b]\nweight = 999\n")
    assert [(p.section, p.key) for p in problems] == [
        ("server a/b", None),
        ("server a/b", "weight"),
    ]


def test_missing_server_address_is_a_problem() -> None:
    problem = only_problem("[server s1]\ncookie = s1\n")
    assert (problem.section, problem.key) == ("server s1", "address")
    assert "missing" in problem.message


def test_a_configuration_without_servers_is_a_problem() -> None:
    problem = only_problem("[proxy]\nlisten = tcp:3030\n")
    assert problem.key is None
    assert "at least one backend" in problem.message


def test_an_empty_file_is_a_problem() -> None:
    assert "at least one backend" in only_problem("").message


def test_two_servers_with_one_cookie_value_is_the_seed_mistake() -> None:
    # The seed's first HAProxy configuration gave both servers "cookie websrv1".
    text = (
        "[server s1]\naddress = storifyeditor1.prod.livefyre.com:3030\ncookie = websrv1\n"
        "[server s2]\naddress = storifyeditor2.prod.livefyre.com:3030\ncookie = websrv1\n"
    )
    problem = only_problem(text)
    assert str(problem) == "[server s2] cookie: value 'websrv1' is already used by [server s1]"


def test_an_explicit_cookie_may_not_collide_with_a_default_one() -> None:
    text = "[server s1]\naddress = h:1\n[server s2]\naddress = h:2\ncookie = s1\n"
    assert (
        str(only_problem(text)) == "[server s2] cookie: value 's1' is already used by [server s1]"
    )


def test_each_duplicate_cookie_is_reported_against_its_first_owner() -> None:
    text = "".join(f"[server s{i}]\naddress = h:{i}\ncookie = same\n" for i in (1, 2, 3))
    assert [str(p) for p in problems_of(text)] == [
        "[server s2] cookie: value 'same' is already used by [server s1]",
        "[server s3] cookie: value 'same' is already used by [server s1]",
    ]


def test_duplicate_keys_are_reported_every_time() -> None:
    text = "[server s1]\naddress = h:1\nweight = 1\nweight = 2\n[health]\nrise = 1\nrise = 2\n"
    problems = problems_of(text)
    assert [(p.section, p.key) for p in problems] == [("server s1", "weight"), ("health", "rise")]
    assert "line 4" in problems[0].message
    assert "line 7" in problems[1].message


def test_continuation_lines_of_a_duplicate_key_go_with_it() -> None:
    text = (
        ONE_SERVER + "[proxy]\ntrusted_proxies = 10.0.0.0/8\n"
        "trusted_proxies = 10.0.0.0/8,\n  not-a-network\n"
    )
    assert [p.key for p in problems_of(text)] == ["trusted_proxies"]


def test_duplicate_sections_are_reported_every_time() -> None:
    text = ONE_SERVER + "[health]\nrise = 1\n[health]\nfall = 2\n[server s1]\naddress = h:2\n"
    problems = problems_of(text)
    assert sorted((p.section, p.key) for p in problems) == [("health", None), ("server s1", None)]
    assert all("more than once" in p.message for p in problems)


def test_two_spellings_of_one_server_name_are_duplicates() -> None:
    problem = only_problem(ONE_SERVER + "[server  s1]\naddress = h:2\n")
    assert problem.message == "server 's1' is already defined by [server s1]"


def test_a_line_that_is_not_key_value_is_reported_with_its_number() -> None:
    problem = only_problem(ONE_SERVER + "[health]\nrise 2\n")
    assert problem.section == "health"
    assert problem.message == "line 4: 'rise 2' is not a 'key = value' line"


def test_keys_before_the_first_section_are_reported() -> None:
    problem = only_problem("listen = tcp:3030\n" + ONE_SERVER)
    assert problem.key == "listen"
    assert str(problem) == "[(top of file)] listen: keys must come after a [section] header"


def test_demo_backends_need_loopback_addresses() -> None:
    text = (
        "[demo]\nbackends = true\n"
        "[server s1]\naddress = 127.0.0.1:8081\n"
        "[server s2]\naddress = [::1]:8082\n"
        "[server s3]\naddress = localhost:8083\n"
        "[server s4]\naddress = 10.0.0.4:8084\n"
        "[server s5]\naddress = editor.example.com:8085\n"
    )
    problems = problems_of(text)
    assert [(p.section, p.key) for p in problems] == [
        ("server s4", "address"),
        ("server s5", "address"),
    ]
    assert all("loopback" in p.message for p in problems)


def test_demo_backends_need_one_port_per_server() -> None:
    text = (
        "[demo]\nbackends = true\n"
        "[server a]\naddress = 127.0.0.1:1\n"
        "[server b]\naddress = 127.0.0.1:1\n"
    )
    problem = only_problem(text)
    assert (problem.section, problem.key) == ("server b", "address")
    assert "[server a]" in problem.message


def test_remote_addresses_are_fine_without_demo_backends() -> None:
    assert parse_config("[demo]\nbackends = false\n[server s1]\naddress = 10.0.0.4:1\n")


# --- every problem at once -----------------------------------------------------------


def test_five_different_problems_are_all_reported() -> None:
    text = (
        "[proxy]\n"
        "timeout_connect = 5000\n"  # bare number
        "lisen = tcp:3030\n"  # unknown key
        "[helth]\n"  # unknown section
        "[server s1]\naddress = storifyeditor1.prod.livefyre.com:3030\ncookie = websrv1\n"
        "[server s2]\naddress = storifyeditor2.prod.livefyre.com:3030\ncookie = websrv1\n"
        "[server s3]\nweight = 10\n"  # no address
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="seed.ini")
    assert sorted((p.section, p.key) for p in info.value.problems) == [
        ("helth", None),
        ("proxy", "lisen"),
        ("proxy", "timeout_connect"),
        ("server s2", "cookie"),
        ("server s3", "address"),
    ]
    assert info.value.source == "seed.ini"
    assert str(info.value).startswith("seed.ini: 5 problem(s):")


def test_structural_and_value_problems_are_reported_together() -> None:
    text = "stray = 1\n[health]\nrise = 0\nrise = 1\nnonsense\n[server s1]\naddress = h\n"
    keys = sorted((p.section, str(p.key)) for p in problems_of(text))
    assert keys == [
        ("(top of file)", "stray"),
        ("health", "None"),
        ("health", "rise"),
        ("health", "rise"),
        ("server s1", "address"),
    ]


# --- files -----------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sp.ini"
    path.write_text(ONE_SERVER, encoding="utf-8")
    assert load_config(str(path)) == parse_config(ONE_SERVER)


def test_load_config_names_the_file_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "sp.ini"
    path.write_text("[server s1]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.source == str(path)


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ini"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    [problem] = info.value.problems
    assert f"cannot read {missing}" in problem.message


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[server s\xe9]\naddress = h:1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "cannot read" in info.value.problems[0].message


# --- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("2.m", 120.0),
        ("0s", 0.0),
        (" 10s ", 10.0),
    ],
)
def test_durations_take_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_bare_number_is_refused_with_the_haproxy_reading_explained() -> None:
    with pytest.raises(ValueError, match="no unit") as info:
        parse_duration("5000")
    message = str(info.value)
    assert "5000ms" in message
    assert "HAProxy" in message
    assert "milliseconds" in message


@pytest.mark.parametrize(
    "text", ["", "s", "10 s", "10S", "1d", "-1s", "+1s", "1e3ms", "ten s", "1.2.3s", "inf s"]
)
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_an_overflowing_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "h")


UNITS = {"ms": 1000, "s": 1, "m": 1 / 60, "h": 1 / 3600}


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS)))
def test_a_whole_number_of_any_unit_parses_to_that_many_units(number: int, unit: str) -> None:
    assert math.isclose(parse_duration(f"{number}{unit}") * UNITS[unit], number)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
@example(0.1)
@example(1e-5)
@example(5e-324)
@example(86400.0)
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (10, "10s"),
        (90, "90s"),
        (300, "5m"),
        (3600, "1h"),
        (0.25e-3, "0.00025s"),
    ],
)
def test_format_duration_picks_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_format_duration_refuses_what_no_duration_means(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("15360", 15360), ("16k", 16384), ("16K", 16384), ("1m", 1048576), ("1g", 2**30)],
)
def test_sizes_are_bytes_or_take_k_m_g(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "1.5k", "16kb", "-1", "1 k", "1t"])
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "k", "m", "g"]))
def test_sizes_scale_by_powers_of_1024(number: int, unit: str) -> None:
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    assert parse_size(f"{number}{unit}") == number * factor


# --- robustness ------------------------------------------------------------------------------

LINES = st.sampled_from(
    [
        "[proxy]",
        "[server s1]",
        "[server s2]",
        "[server]",
        "[cookie]",
        "[demo]",
        "[DEFAULT]",
        "[",
        "address = 127.0.0.1:1",
        "address = h:99999",
        "cookie = s1",
        "backends = true",
        "samesite = None",
        "listen = tcp:1",
        "  continued",
        "weight = 300",
        "= value",
        "key",
        "; comment",
        "",
    ]
)


@given(st.lists(st.one_of(LINES, st.text(max_size=30)), max_size=25))
@example(["[server s1]", "address = h:1", "[server s1]", "address = h:1"])
@example(["[server s1]", "address = h:1", "weight = 1", "  2", "weight = 3", "  4"])
def test_any_text_gives_a_configuration_or_a_config_error(lines: list[str]) -> None:
    try:
        config = parse_config("\n".join(lines))
    except ConfigError as error:
        assert error.problems
        assert all(isinstance(p, ConfigProblem) for p in error.problems)
    else:
        assert config.servers


# -- [engineio] and the newer cookie keys --------------------------------------------------

MINIMAL = "[server s1]\naddress = 127.0.0.1:1\n"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("path", "/engine.io/", "/engine.io/"),
        ("path", "", ""),
        ("sid_tag", "eio4", "eio4"),
        ("sid_store", "redis://10.0.0.5:6379/2", "redis://10.0.0.5:6379/2"),
        ("sid_store", "unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
        ("sid_store", "", None),
        ("sid_store_timeout", "100ms", 0.1),
        ("max_sessions", "5000", 5000),
        ("sid_cookie", "io", "io"),
    ],
)
def test_engineio_keys_parse(key: str, value: str, expected: object) -> None:
    config = parse_config(f"{MINIMAL}[engineio]\n{key} = {value}\n")
    assert getattr(config.engineio, key) == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("path", "socket.io", "starting with '/'"),
        ("sid_tag", "eio3", "expected"),
        ("sid_store", "rediss://h:1/0", "TLS is not supported"),
        ("sid_store", "redis://h:99999/0", "out of range"),
        ("sid_store", "http://h/", "redis:// or unix://"),
        ("max_sessions", "0", ""),
    ],
)
def test_bad_engineio_values_say_what_was_expected(key: str, value: str, message: str) -> None:
    problem = only_problem(f"{MINIMAL}[engineio]\n{key} = {value}\n")
    assert (problem.section, problem.key) == ("engineio", key)
    assert message in problem.message


def test_server_tags_default_to_an_opaque_value_derived_from_the_name() -> None:
    config = parse_config(MINIMAL + "[server s2]\naddress = 127.0.0.1:2\ntag = blue\n")
    first, second = config.servers
    assert first.tag == "" and len(first.engine_tag) == 8 and "s1" not in first.engine_tag
    assert first.engine_tag == parse_config(MINIMAL).servers[0].engine_tag
    assert second.engine_tag == "blue"


def test_two_servers_with_one_tag_is_an_error() -> None:
    problem = only_problem(
        MINIMAL.replace("\n", "\ntag = same\n", 1)
        + "[server s2]\naddress = 127.0.0.1:2\ntag = same\n"
    )
    assert (problem.section, problem.key) == ("server s2", "tag")
    assert "already used by [server s1]" in problem.message


def test_secure_auto_is_accepted_and_allows_samesite_none() -> None:
    config = parse_config(MINIMAL + "[cookie]\nsecure = auto\nsamesite = None\n")
    assert config.cookie.secure == "auto"


def test_the_legacy_twin_cookie_needs_samesite_none() -> None:
    problem = only_problem(MINIMAL + "[cookie]\nsamesite = Lax\nsamesite_legacy = true\n")
    assert (problem.section, problem.key) == ("cookie", "samesite_legacy")


def test_a_decision_header_must_be_a_header_name() -> None:
    problem = only_problem(MINIMAL + "[proxy]\ndecision_header = X Route\n")
    assert (problem.section, problem.key) == ("proxy", "decision_header")
