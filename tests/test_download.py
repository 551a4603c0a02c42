"""checkpoint.download against a real HTTP server on 127.0.0.1: complete, resumed after a cut, a bad checksum,
a server that compresses anyway, a cut in a response of unknown size; and every download that fails
(no server, no answer, an HTTP error) saying in one line what to do offline."""
import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

import checkpoint
import conversations
import data
from checkpoint import DownloadError, download
from conftest import ROOT
from gpt import main as describe_model
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at /file, honours Range requests, and can cut the first response short."""

    def __init__(self):
        self.cut_at = None  # send only this many bytes of the next response, then drop the connection
        self.ranges = []  # the Range header of every request, for the assertions
        self.etag = SHA
        self.gzip = False  # compress the body whatever the client asked for (Content-Length: compressed size)
        self.chunked = False  # chunked transfer: no Content-Length, so the client cannot know the size
        self.accept_encodings = []  # the Accept-Encoding header of every request
        self.status = 200  # anything else: answer every request with this error
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                outer.accept_encodings.append(self.headers.get("Accept-Encoding"))
                if outer.status != 200:
                    self.send_error(outer.status)
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                body = PAYLOAD[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                if outer.gzip:
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                if outer.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Linked-Etag", f'"{outer.etag}"')
                    self.end_headers()
                    sent = body if outer.cut_at is None else body[:outer.cut_at]
                    for i in range(0, len(sent), 65536):
                        piece = sent[i:i + 65536]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    if outer.cut_at is None:
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    outer.cut_at = None
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Linked-Etag", f'"{outer.etag}"')
                self.end_headers()
                if outer.cut_at is not None:
                    self.wfile.write(body[:outer.cut_at])
                    self.wfile.flush()
                    outer.cut_at = None
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_complete_download_is_verified_and_cached(server, tmp_path):
    dest = download(server.url, tmp_path / "m.safetensors")
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "m.safetensors.part").exists()
    download(server.url, tmp_path / "m.safetensors")  # already there: no second request
    assert server.ranges == [None]


def test_cut_connection_resumes_with_range_request(server, tmp_path):
    server.cut_at = 300_000
    with pytest.raises(IOError, match="run again to resume"):
        download(server.url, tmp_path / "m.safetensors")
    part = tmp_path / "m.safetensors.part"
    assert not (tmp_path / "m.safetensors").exists()  # never the final name while incomplete
    kept = part.stat().st_size
    assert 0 < kept <= 300_000  # what arrived before the cut (less what was still in the read buffer)
    dest = download(server.url, tmp_path / "m.safetensors")
    assert server.ranges == [None, f"bytes={kept}-"]
    assert dest.read_bytes() == PAYLOAD  # and the checksum over the whole file held


def test_checksum_mismatch_is_an_error_and_deletes_the_file(server, tmp_path):
    server.etag = "0" * 64
    with pytest.raises(IOError, match="checksum mismatch"):
        download(server.url, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    assert not (tmp_path / "m.safetensors.part").exists()


def test_explicit_sha256_is_checked(server, tmp_path):
    server.etag = ""
    with pytest.raises(IOError, match="checksum mismatch"):
        download(server.url, tmp_path / "x", sha256="f" * 64)
    assert download(server.url, tmp_path / "y", sha256=SHA).read_bytes() == PAYLOAD


def test_asks_for_the_file_uncompressed(server, tmp_path):
    download(server.url, tmp_path / "m")
    assert server.accept_encodings == ["identity"]  # so sizes and Range offsets are the file's own


def test_a_server_that_compresses_anyway_still_gives_the_file(server, tmp_path):
    # Content-Length is then the gzip size while the bytes written are decompressed: not comparable
    server.gzip = True
    assert download(server.url, tmp_path / "m").read_bytes() == PAYLOAD


def test_complete_chunked_response_of_unknown_size_is_accepted(server, tmp_path):
    server.chunked = True
    assert download(server.url, tmp_path / "m").read_bytes() == PAYLOAD


def test_cut_in_a_response_of_unknown_size_is_an_error_not_a_file(server, tmp_path):
    server.chunked, server.cut_at = True, 300_000
    with pytest.raises(IOError, match="stopped at"):
        download(server.url, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # a half file never gets the final name
    assert download(server.url, tmp_path / "m").read_bytes() == PAYLOAD  # and the next call completes it


# ----------------------------------------------------------------------------- failures, and what to do offline

@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that nothing listens on: connecting is refused at once, as offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_no_answer_and_an_http_error_are_each_named_in_a_few_words(server, closed_port, tmp_path):
    url = f"http://127.0.0.1:{closed_port}/m"
    with pytest.raises(DownloadError) as e:
        download(url, tmp_path / "m")
    assert str(e.value) == f"cannot download {url} (cannot reach 127.0.0.1: no network, or the server is down)"
    with socket.socket() as mute:  # accepts connections (the kernel's backlog) and never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        url = f"http://127.0.0.1:{mute.getsockname()[1]}/m"
        with pytest.raises(DownloadError) as e:
            download(url, tmp_path / "m", timeout=0.2)
    assert str(e.value) == f"cannot download {url} (no answer from 127.0.0.1 within 0.2 s)"
    server.status = 404
    with pytest.raises(DownloadError) as e:
        download(server.url, tmp_path / "m")
    assert str(e.value) == f"cannot download {server.url} (the server answered 404 Not Found)"
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_offline_the_released_weights_say_where_to_put_the_file_or_what_to_give_instead(closed_port, tmp_path,
                                                                                         monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "HUB_URL", f"http://127.0.0.1:{closed_port}/{{name}}/model.safetensors")
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        describe_model(["gpt2"])
    err = capsys.readouterr().err
    assert err == (f"error: cannot load model 'gpt2': cannot download http://127.0.0.1:{closed_port}/gpt2/model.safetensors"
                   f" (cannot reach 127.0.0.1: no network, or the server is down); offline, copy that file to "
                   f"{tmp_path / 'gpt2' / 'model.safetensors'}, or give a checkpoint directory or .safetensors file "
                   "in place of 'gpt2'\n")


def test_offline_a_named_dataset_points_to_data_file(closed_port, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port}/alpaca_data.json"
    monkeypatch.setitem(conversations.DATASETS, "alpaca", url)
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    with pytest.raises(conversations.DataError) as e:
        conversations.load_conversations("alpaca")
    assert str(e.value).startswith(f"the alpaca dataset: cannot download {url} (cannot reach 127.0.0.1")
    assert str(e.value).endswith(f"; offline, copy that file to {tmp_path / 'data' / 'alpaca_data.json'}, "
                                 "or give a JSON or JSONL file on this machine (--data FILE)")


def test_offline_a_pretraining_source_says_to_give_a_local_text_file(closed_port, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port}/stories.txt"
    monkeypatch.setitem(data.PRETRAIN_DATASETS, "tinystories-small", (url, None))
    with pytest.raises(ValueError) as e:
        data.prepare_pretrain_data("tinystories-small", tmp_path / "tokens")
    assert str(e.value) == (f"cannot download {url} (cannot reach 127.0.0.1: no network, or the server is down); "
                            f"offline, copy that file to {tmp_path / 'tokens' / 'stories.txt'}, or give a text file "
                            "on this machine instead")
    assert not (tmp_path / "tokens").exists()  # no empty folder left behind


def test_offline_without_the_tokenizer_files_names_tiktoken_cache_dir(closed_port, tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "NO_PROXY": "", "no_proxy": "",
           "HTTPS_PROXY": f"http://127.0.0.1:{closed_port}", "HTTP_PROXY": f"http://127.0.0.1:{closed_port}"}
    r = subprocess.run([sys.executable, "-c", "from tokenizer import get_tokenizer; get_tokenizer()"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: cannot load GPT-2's tokenizer files") and "TIKTOKEN_CACHE_DIR" in r.stderr


def test_a_size_header_that_is_not_a_number_is_a_download_error(server, tmp_path, monkeypatch):
    import requests
    real = requests.get

    def lying(*args, **kwargs):
        r = real(*args, **kwargs)
        r.headers["Content-Length"] = "lots"
        return r
    monkeypatch.setattr(requests, "get", lying)
    with pytest.raises(DownloadError, match=r"the server sent a size that is not a number"):
        download(server.url, tmp_path / "m")
