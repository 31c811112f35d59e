"""junit.xml written as tests end, so a run cut short keeps its record (the GPU kit: ``-p tests.gpu.kit_record``).

pytest writes ``--junitxml`` once, when the session ends; the kit's tests part runs under a
time limit, and a part killed at its limit would leave no junit.xml at all. With this plugin
the file is rewritten (atomically) when each test starts and when it ends: every test that
ended, with its outcome and what it printed (the numbers it compared), and the one running
as an error "did not finish". A session that ends normally then overwrites it with pytest's
own report. Imports nothing heavy: usable on any test directory.
"""

from __future__ import annotations

import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import pytest

# XML 1.0 has no place for most control characters (ANSI colours, stray bytes): escaped.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_UNFINISHED = "did not finish: started at {} and still running when the run ended (the tests part's time limit?)"


def _text(value: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


class _Case:
    """One test's phases as pytest reports them."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.reports: list[pytest.TestReport] = []
        self.started = time.time()

    def element(self, finished: bool) -> ET.Element:
        path, *names = self.nodeid.split("::")
        classname = ".".join([path.removesuffix(".py").replace("/", "."), *names[:-1]])
        seconds = sum(r.duration for r in self.reports) if finished else time.time() - self.started
        case = ET.Element("testcase", classname=classname, name=names[-1] if names else path, time=f"{seconds:.3f}")
        if not finished:
            ET.SubElement(case, "error", message=_UNFINISHED.format(time.strftime("%H:%M:%S", time.localtime(self.started))))
        for report in self.reports:
            if report.failed:
                tag = "failure" if report.when == "call" else "error"
                ET.SubElement(case, tag, message=f"{report.when} failed").text = _text(report.longreprtext)
            elif report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                ET.SubElement(case, "skipped", type="pytest.skip", message=_text(reason))
        out = "".join(r.capstdout for r in self.reports)
        if out:
            ET.SubElement(case, "system-out").text = _text(out)
        return case

    def outcome(self, finished: bool) -> str:
        if not finished or any(r.failed and r.when != "call" for r in self.reports):
            return "errors"
        if any(r.failed for r in self.reports):
            return "failures"
        return "skipped" if any(r.skipped for r in self.reports) else "passed"


class PartialJUnit:
    """Rewrites ``path`` at every test's start and end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cases: dict[str, _Case] = {}
        self.running: Optional[str] = None
        self.started = time.time()

    def write(self) -> None:
        counts = {"errors": 0, "failures": 0, "skipped": 0, "passed": 0}
        cases = []
        for nodeid, case in self.cases.items():
            finished = nodeid != self.running
            counts[case.outcome(finished)] += 1
            cases.append(case.element(finished))
        suite = ET.Element("testsuite", name="pytest", errors=str(counts["errors"]), failures=str(counts["failures"]),
                           skipped=str(counts["skipped"]), tests=str(len(cases)),
                           time=f"{time.time() - self.started:.3f}",
                           timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                           hostname=socket.gethostname())
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="partial",
                      value="written as tests ended; pytest's own report replaces it when the session ends")
        suite.extend(cases)
        root = ET.Element("testsuites")
        root.append(suite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous complete file

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.cases[nodeid] = _Case(nodeid)
        self.running = nodeid
        self.write()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid in self.cases:
            self.cases[report.nodeid].reports.append(report)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        self.running = None
        self.write()


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("xmlpath", None)
    if path and not hasattr(config, "workerinput"):  # xdist workers report to the controller
        config.pluginmanager.register(PartialJUnit(Path(path).expanduser().resolve()), "kit_partial_junit")
