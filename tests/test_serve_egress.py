"""Webhook targets are an allow-list decision (OWASP SSRF rules): private, loopback, link-local (cloud metadata),
shared, multicast and reserved addresses, credentials in URLs and hosts that do not resolve are refused at submission
(400) and again at delivery, after DNS resolution, connecting to the checked address (DNS rebinding cannot swap it);
redirects are not followed; ``--webhook-allow HOST|CIDR`` opens what an operator trusts."""
import http.server
import socket
import threading

import pytest

from diffaccel.engines.serving.egress import EgressPolicy, address_kind, parse_allow
from diffaccel.engines.serving.webhooks import post

REFUSED = {
    "http://127.0.0.1/h": "loopback", "http://[::1]:8080/h": "loopback", "http://10.1.2.3/h": "private",
    "http://172.16.0.1/h": "private", "http://192.168.1.1/h": "private", "http://169.254.169.254/latest": "link-local",
    "http://100.100.100.200/meta": "non-public", "http://0.0.0.0/h": "unspecified", "http://224.0.0.1/h": "multicast",
    "http://[fd00:ec2::254]/h": "private", "http://[::ffff:10.0.0.1]/h": "private", "https://240.0.0.1/h": "reserved",
    "http://user:pw@example.com/h": "credentials", "http://no-such-host.invalid/h": "does not resolve",
    "ftp://example.com/h": "http", "http://example.com:99999/h": "port",
}


@pytest.mark.parametrize("url, why", list(REFUSED.items()))
def test_private_and_odd_targets_are_refused_naming_why(url, why):
    problem = EgressPolicy().problem(url)
    assert problem is not None and why in problem and "\n" not in problem


def test_public_addresses_pass_and_the_allow_list_opens_networks_and_hosts():
    assert EgressPolicy().problem("https://93.184.216.34/hook") is None
    assert address_kind(__import__("ipaddress").ip_address("8.8.8.8")) is None
    policy = EgressPolicy(allow=("127.0.0.0/8", "hooks.internal"), resolve=_resolver({"hooks.internal": "10.9.9.9"}))
    assert policy.problem("http://127.0.0.1:9000/h") is None and policy.problem("http://hooks.internal/h") is None
    assert "private" in policy.problem("http://10.9.9.9/h")          # the host is trusted, not its network
    for bad in ("", "a b", "x/y/z", "user@host"):
        with pytest.raises(ValueError):
            parse_allow(bad)


def _resolver(table: dict):
    def getaddrinfo(host, port, type=0):
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]
    return getaddrinfo


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []
    answer: tuple = (204, {})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _Receiver.got.append((self.server.server_port, dict(self.headers)))
        status, headers = _Receiver.answer
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def receivers():
    _Receiver.got, _Receiver.answer = [], (204, {})
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [s.server_port for s in servers]
    for s in servers:
        s.shutdown()


def test_a_delivery_connects_to_the_checked_address_with_the_urls_host(receivers):
    port = receivers[0]
    policy = EgressPolicy(allow=("127.0.0.0/8",), resolve=_resolver({"hooks.test": "127.0.0.1"}))
    assert post(policy, f"http://hooks.test:{port}/in?x=1", b"{}", {"content-type": "application/json"}, 5) == 204
    assert _Receiver.got[0][1]["Host"] == f"hooks.test:{port}"


def test_dns_rebinding_cannot_swap_in_a_private_address(receivers):
    """The host resolved to a public address when the job was submitted, and to the loopback at delivery."""
    answers = iter(["93.184.216.34", "127.0.0.1"])

    def getaddrinfo(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]
    policy = EgressPolicy(resolve=getaddrinfo)
    url = f"http://rebind.test:{receivers[0]}/h"
    assert policy.problem(url) is None                      # at submission
    with pytest.raises(ValueError, match="loopback"):
        post(policy, url, b"{}", {}, 5)                      # at delivery: refused before any connection
    assert _Receiver.got == []


def test_redirects_are_not_followed(receivers):
    first, second = receivers
    _Receiver.answer = (307, {"Location": f"http://127.0.0.1:{second}/inside"})
    policy = EgressPolicy(allow=("127.0.0.1",))
    assert post(policy, f"http://127.0.0.1:{first}/h", b"{}", {}, 5) == 307
    assert [p for p, _ in _Receiver.got] == [first]


def test_the_sender_records_a_refused_target_once_and_does_not_retry(tmp_path):
    from diffaccel.engines.serving.store import JobStore
    from diffaccel.engines.serving.webhooks import Sender

    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create({"prompt": "x", "seed": 1, "n": 1})
    store.add_deliveries(job["id"], [("msg_1", "http://169.254.169.254/latest", "{}")])
    sender = Sender(store, b"k" * 24, attempts=5, backoff_s=0.01, timeout_s=1)
    sender._attempt(store.due_deliveries(now=1e12)[0])
    (d,) = store.deliveries(job["id"])
    assert d["status"] == "failed" and d["attempts"] == 1 and d["last_error"].startswith("refused: 169.254.169.254")
