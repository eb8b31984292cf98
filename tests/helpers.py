"""Checks shared by several test files: a PNG that shows something, a dashboard process that serves."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def assert_png_drawn(path: Path, min_size: tuple[int, int], min_coloured: int) -> None:
    """``path`` decodes as a PNG of at least ``min_size`` (width, height) pixels, is not one flat
    colour, and has at least ``min_coloured`` clearly coloured (not grey) pixels: the data drawn,
    not only black axes and text on white."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", f"{path.name} is {im.format}, not PNG"
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)  # decodes every row: a truncated file fails
    height, width, _ = rgb.shape
    assert width >= min_size[0] and height >= min_size[1], f"{path.name} is only {width}x{height}"
    assert rgb.std() > 10, f"{path.name} is (nearly) one flat colour"
    colours = len(np.unique(rgb.reshape(-1, 3), axis=0))
    assert colours >= 16, f"{path.name} has only {colours} distinct colours"
    coloured = int((rgb.max(axis=2) - rgb.min(axis=2) > 80).sum())
    assert coloured >= min_coloured, f"{path.name} has {coloured} coloured pixels, expected {min_coloured}+"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Dashboard:
    url: str  # as the product printed it, without the trailing slash
    url_line: str  # the line on stderr that gave the URL
    stderr: str = ""  # everything it printed on stderr, once stopped
    port: int | None = None  # the port the caller asked for, where it set one


@contextlib.contextmanager
def running_dashboard(python_args: list[str], timeout: float = 60):
    """Run ``python *python_args`` (a dashboard), read the URL it prints on stderr and wait until
    that URL answers; stop it on exit and keep what it printed in ``Dashboard.stderr``."""
    proc = subprocess.Popen([sys.executable, *python_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    dash = None
    printed = ""  # stderr up to and including the line with the URL
    try:
        match = None
        while match is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stderr.readline() if ready else ""
            if not line:
                break
            printed += line
            match = re.search(r"(http://\S+?)/? \(Ctrl-C to stop\)", line)
        if match is None:
            proc.kill()
            pytest.fail(f"the dashboard printed no URL: {printed + proc.stderr.read()!r}")
        dash = Dashboard(url=match.group(1), url_line=line.rstrip("\n"))
        while not answers(f"{dash.url}/api/studies"):
            if proc.poll() is not None:
                pytest.fail(f"the dashboard exited: {printed + proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing answers on {dash.url}, the URL the dashboard printed")
            time.sleep(0.3)
        yield dash
    finally:
        proc.terminate()
        try:
            rest = proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[1]
        if dash is not None:
            dash.stderr = printed + (rest or "")
