"""The operator guides, run as written: ``aggregator/README.md``, ``collaborator/README.md`` and
``certs/README.md``.

Each backend's sections are followed in order by three "hosts", each its own temporary folder:
the coordinator and two hospitals. The fenced ``bash`` blocks are taken from the guides by
section and run with bash (``set -euo pipefail``; a block's ``cd`` carries over to the host's
next block); the Flower data config is the guide's ``yaml`` block, written where its first line
says. The only changes are the mechanical ones of :data:`SUBSTITUTIONS` (absolute system paths,
addresses, ports, the example site name), the test's ``$EDITOR`` (:data:`EDITOR_DOES`) and the
files that travel between hosts (:data:`FLOWER_TRANSFERS`, :data:`OPENFL_TRANSFERS`: e-mail/scp in
real life). Every prompt is answered :data:`PROMPT_ANSWER`. Each host has its own ``FLWR_HOME``,
``PATH`` starts with this Python's bin folder (fedsynth, flwr, fx) and the hospitals run with
``OMP_NUM_THREADS=1``. Commands that run until stopped (SuperLink, SuperNode + site worker, the
OpenFL aggregator and collaborators) are started in the background and always stopped at the end.
Every ``bash`` block of a backend's sections must be run (or listed in :data:`NOT_RUN` with the
reason), so a block added to a guide is tested too.

If a guide is wrong, fix the guide, not this test.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import tiny_config

from fedsynth.config import save_config
from fedsynth.processes import ProcessGroup, free_port, group_exists, log_tail, run_checked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
AGGREGATOR = ROOT / "aggregator" / "README.md"
COLLABORATOR = ROOT / "collaborator" / "README.md"
CERTS = ROOT / "certs" / "README.md"

#: Every change made to the guides' text before it runs: (text in the guide, what runs instead, why).
#: Applied in this order; ``{...}`` are the host's values (a row whose value the host lacks is skipped).
#: Addresses that only go into a certificate (``--host 203.0.113.10``, ``--host 10.0.0.5``) stay:
#: nothing connects to them.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("site1", "{site}", "the guides' example hospital; the second one is site2 (hosp2 for OpenFL)"),
    ("hosp1", "{site}", "the same, in the OpenFL sections"),
    ("RUN_ID", "{run_id}", "the run id `flwr run` printed"),
    ("col_NAME_", "col_{name}_", "the OpenFL site whose request is signed"),
    ("agg.example.org:9092", "127.0.0.1:{fleet}", "the SuperLink's Fleet API: 127.0.0.1, a free port"),
    ("0.0.0.0:9092", "127.0.0.1:{fleet}", "tests listen on 127.0.0.1 only, on free ports"),
    ("127.0.0.1:9091", "127.0.0.1:{serverappio}", "a free port"),
    ("127.0.0.1:9093", "127.0.0.1:{control}", "a free port"),
    ("127.0.0.1:9094", "127.0.0.1:{clientappio}", "a free port (one per site)"),
    ("--bind 10.0.0.5", "--bind 127.0.0.1", "the OpenFL aggregator's interface"),
    ("agg.example.org", "{agg_host}", "the aggregator's name: 127.0.0.1 for Flower (an IP in its certificate); "
                                      "localhost for OpenFL (fx certifies a DNS name; it resolves to 127.0.0.1)"),
    ("/etc/fedsynth", "{root}/etc/fedsynth", "system folders -> the host's temporary folder"),
    ("/srv/fedsynth", "{root}/srv/fedsynth", "the same"),
    ("/data/", "{root}/data/", "the hospital's data folder -> its temporary folder"),
]

#: What the test's ``$EDITOR`` does to the file the guide opens (a person edits it there)
EDITOR_DOES = {
    "gan.yaml": "the experiment: replaced by the tiny test config (tiny_config('gan'), 32x32, 2 local steps, DP on)",
    "fedsynth.yaml": "the same",
    "plan.yaml": "network.settings.agg_port: a free port (the guide's optional fixed port)",
}

#: Files that travel between hosts (e-mail, scp) in the Flower sections: (from, to), {site} per hospital
FLOWER_TRANSFERS = [
    ("coordinator:ca/ca.crt", "{site}:/etc/fedsynth/ca.crt"),  # "Send every hospital ca.crt"
    ("{site}:/etc/fedsynth/{site}.auth.pub", "coordinator:{site}.auth.pub"),  # "sends you only <site>.auth.pub"
]
#: ... and in the OpenFL sections (paths relative to the host's current folder)
OPENFL_TRANSFERS = {
    "workspace": ("coordinator:fl-gan.zip", "{site}:fl-gan.zip"),
    "request": ("{site}:col_{site}_to_agg_cert_request.zip", "coordinator:col_{site}_to_agg_cert_request.zip"),
    "signed": ("coordinator:agg_to_col_{site}_signed_cert.zip", "{site}:agg_to_col_{site}_signed_cert.zip"),
}

#: Bash blocks not run, with the reason: (guide file name, ## heading, ### heading, block index) -> why
NOT_RUN: dict[tuple[str, str, str, int], str] = {}

#: The answer to every prompt (stdin of every block): the guides say "answer y" to fx's questions
PROMPT_ANSWER = "y"

#: The aggregator's Flower step 4 is a list of commands, not a script: what the test does with each line
FLOWER_STEP4 = {
    "flwr run": "run; its output names RUN_ID",
    "flwr log": "run with --show (as written it follows the log until Ctrl-C)",
    "tail -f": "the test follows the same file until its 'done' event (tail -f never returns)",
    "flwr ls": "run (after 'done')",
    "flwr stop": "not run: it would stop the run",
}

ROUNDS = 2
TIMEOUT = 240  # seconds for one federation


# ---------------------------------------------------------------------------------------------- guides


def sections(path: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Fenced blocks of a guide by (## heading, ### heading): [(language, code), ...] in order."""
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    h2 = h3 = lang = ""
    fence: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if fence is not None:
            if line.startswith("```"):
                out.setdefault((h2, h3), []).append((lang, "\n".join(fence) + "\n"))
                fence = None
            else:
                fence.append(line)
        elif line.startswith("```"):
            lang, fence = line[3:].strip(), []
        elif line.startswith("## "):
            h2, h3 = line[3:].strip(), ""
        elif line.startswith("### "):
            h3 = line[4:].strip()
    return out


@dataclass
class Guides:
    """Hands out the guides' blocks and remembers which bash blocks were taken."""

    used: set[tuple[str, str, str, int]] = field(default_factory=set)

    def block(self, path: Path, h2: str, h3: str, index: int = 0, lang: str = "bash") -> str:
        found = [(key, blocks) for key, blocks in sections(path).items() if key[0] == h2 and key[1].startswith(h3)]
        assert len(found) == 1, f"{path.relative_to(ROOT)}: expected one section '## {h2}' / '### {h3}...', found {found}"
        (key, blocks), = found
        code = [c for lng, c in blocks if lng == lang]
        assert index < len(code), f"{path.relative_to(ROOT)} '{key[1]}': no {lang} block #{index}"
        if lang == "bash":
            self.used.add((path.name, h2, key[1], index))
        return code[index]

    def check_all_run(self, paths: list[Path], h2: str | None) -> None:
        """Every bash block of the guides' ``h2`` sections (``None``: all) was run or is in NOT_RUN."""
        missing = []
        for path in paths:
            for (s2, s3), blocks in sections(path).items():
                count = sum(lng == "bash" for lng, _ in blocks)
                missing += [f"{path.relative_to(ROOT)} '{s2}' / '{s3}' block #{i}" for i in range(count)
                            if (h2 is None or s2 == h2) and (path.name, s2, s3, i) not in self.used | set(NOT_RUN)]
        assert not missing, f"bash blocks of the guides that no test runs: {missing}"


# ---------------------------------------------------------------------------------------------- hosts


@dataclass
class Host:
    """One machine of the federation: its own folder, environment and current folder."""

    name: str
    root: Path
    values: dict[str, str]
    env: dict[str, str]
    cwd: Path = Path()
    steps: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cwd = self.root
        self.values = {"root": str(self.root), **self.values}
        self.env = {**self.env, "FLWR_HOME": str(self.root / "flwr-home")}  # each machine its own Flower home

    def substitute(self, text: str) -> str:
        for old, new, _ in SUBSTITUTIONS:
            try:
                text = text.replace(old, new.format(**self.values))
            except KeyError:  # a value this host does not have (e.g. {site} on the coordinator)
                continue
        return text

    def path(self, where: str) -> Path:
        """``/abs`` (substituted) or a path relative to the current folder."""
        where = self.substitute(where)
        return Path(where) if where.startswith("/") else self.cwd / where

    def _script(self, label: str, code: str, track_cwd: bool) -> Path:
        self.steps += 1
        guide = self.root / ".guide"
        guide.mkdir(exist_ok=True)
        answers = guide / "answers"
        answers.write_text(f"{PROMPT_ANSWER}\n" * 20, encoding="utf-8")
        script = guide / f"{self.steps:02d}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.sh"
        text = f"set -euo pipefail\nexec 0<'{answers}'\n{self.substitute(code)}"
        if track_cwd:
            text += f"\npwd > '{guide / 'cwd'}'\n"
        script.write_text(text, encoding="utf-8")
        return script

    def run(self, label: str, code: str, timeout: float = 180) -> str:
        """Run a block to completion; returns its output; a failure shows the script and its output."""
        script = self._script(label, code, track_cwd=True)
        log = script.with_suffix(".log")
        try:
            run_checked(["bash", str(script)], self.cwd, log, timeout, self.env)
        except Exception as err:
            raise AssertionError(f"{self.name}: '{label}' failed:\n{script.read_text(encoding='utf-8')}\n{err}") from None
        self.cwd = Path((self.root / ".guide" / "cwd").read_text(encoding="utf-8").strip())
        return log.read_text(encoding="utf-8", errors="replace")

    def start(self, procs: ProcessGroup, label: str, code: str) -> str:
        """Start a block that runs until stopped, in the background; returns its process name."""
        script = self._script(label, code, track_cwd=False)
        name = f"{self.name}: {label}"
        procs.start(name, ["bash", str(script)], self.cwd, script.with_suffix(".log"), self.env)
        return name


def transfer(hosts: dict[str, Host], source: str, target: str, site: str) -> None:
    """Copy a file from one host to another (``host:path``, ``{site}`` filled in), as e-mail or scp would."""
    (src_host, src), (dst_host, dst) = (x.format(site=site).split(":", 1) for x in (source, target))
    src_path, dst_path = hosts[src_host].path(src), hosts[dst_host].path(dst)
    assert src_path.is_file(), f"{source} ({src_path}): the guide's step did not write it"
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_path, dst_path)


def _env(**extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # fedsynth, flwr, fx, flower-superlink, python
    return {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1", **extra}


def _hospital_data(folder: Path, brain_csv: Path) -> None:
    """What a hospital already has: train.csv and val.csv (relative image paths, as `fedsynth
    build-dataset` writes them) next to its images."""
    rows = list(csv.reader(brain_csv.open(encoding="utf-8")))
    header, body = rows[0], rows[1:]
    folder.mkdir(parents=True, exist_ok=True)
    for row in body:
        (folder / row[1]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(brain_csv.parent / row[1], folder / row[1])
    for name, part in (("train.csv", body[:18]), ("val.csv", body[18:])):
        with (folder / name).open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([header, *part])
    assert not Path(body[0][1]).is_absolute()


def _editor(folder: Path, config: Path, agg_port: int) -> Path:
    """The ``$EDITOR`` the guides call: see :data:`EDITOR_DOES`."""
    editor = folder / "editor"
    editor.write_text(f"""#!{sys.executable}
import re, shutil, sys
from pathlib import Path
path = Path(sys.argv[1])
if path.name == "plan.yaml":
    path.write_text(re.sub(r"(?m)^(\\s*agg_port:)[ \\t]*[^\\s#]*", r"\\g<1> {agg_port}", path.read_text()))
else:
    shutil.copyfile({str(config)!r}, path)
""", encoding="utf-8")
    editor.chmod(0o755)
    return editor


def _tiny_config(path: Path) -> Path:
    # with DP: the guides' hospitals keep the default floor of their data config, which requires it
    cfg = tiny_config("gan", federation__rounds=ROUNDS, federation__local_steps=2, federation__min_sites=2,
                      federation__round_timeout_s=120.0, federation__groups={"discriminator": "local"},
                      privacy={"enabled": True, "noise_multiplier": 1.2, "max_grad_norm": 1.0})
    save_config(cfg, path)
    return path


def map_str(values: dict[str, int]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def _brains(mri2d: dict[str, Path]) -> list[Path]:
    # two different real brains; without Debian's mricron-data (Colin27) both hospitals hold MNI152
    return [mri2d["mni152"], mri2d.get("colin27", mri2d["mni152"])]


def _assert_stopped(procs: ProcessGroup) -> None:
    for name, proc in procs.procs.items():
        assert proc.popen.poll() is not None and not group_exists(proc.pid), f"{name} survived"


# ---------------------------------------------------------------------------------------------- Flower


def _wait_for_done(progress: Path, procs: ProcessGroup, timeout: float) -> dict[str, object]:
    """Follow progress.jsonl (what `tail -f` shows) until 'done'; fail on 'error' or a dead process."""
    deadline = time.monotonic() + timeout
    while True:
        events = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines()] if progress.is_file() else []
        for event in events:
            if event["event"] == "done":
                return event
            assert event["event"] != "error", f"the federation failed: {event}"
        dead = [name for name, proc in procs.procs.items() if not proc.alive()]
        assert not dead, f"{dead[0]} exited:\n{procs.tail(dead[0], 40)}"
        if time.monotonic() > deadline:
            tails = "\n".join(f"{n}:\n{log_tail(p.log, 15)}" for n, p in procs.procs.items())
            raise AssertionError(f"no 'done' in {progress} after {timeout:.0f} s; events {events}\n{tails}")
        time.sleep(0.5)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="the collaborator guide generates the key with ssh-keygen")
def test_flower_guides(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    pytest.importorskip("flwr")
    pytest.importorskip("opacus")  # the hospitals require DP by default
    started = time.monotonic()
    guides = Guides()
    config = _tiny_config(tmp_path / "tiny.yaml")
    ports = {"fleet": free_port(), "serverappio": free_port(), "control": free_port()}
    coord = Host("coordinator", tmp_path / "coordinator", {"agg_host": "127.0.0.1", **map_str(ports)},
                 _env(EDITOR=str(_editor(tmp_path, config, 0))))
    sites = {s: Host(s, tmp_path / s, {"site": s, "agg_host": "127.0.0.1", "clientappio": str(free_port()),
                                       **map_str(ports)}, _env(OMP_NUM_THREADS="1"))
             for s in ("site1", "site2")}
    hosts = {"coordinator": coord, **sites}
    for site, brain in zip(sites.values(), _brains(mri2d), strict=True):
        _hospital_data(site.root / "data" / "fedsynth", brain)

    # certs/README.md, on the operator's offline machine (a folder of its own)
    offline = Host("offline", tmp_path / "offline", {"agg_host": "127.0.0.1"}, _env())
    offline.run("certs guide", guides.block(CERTS, "", "", 0))

    with ProcessGroup(grace=5.0) as procs:
        coord.run("1. certificates", guides.block(AGGREGATOR, "Flower", "1. Certificates", 0))
        for site in sites.values():
            site.run("2. keys", guides.block(COLLABORATOR, "Flower", "2. Keys"))
            data_config = site.substitute(guides.block(COLLABORATOR, "Flower", "1. Data", 0, lang="yaml"))
            where = re.match(r"#\s*(\S+)", data_config)
            assert where, "the data config block names its path in its first line"
            Path(where.group(1)).write_text(data_config, encoding="utf-8")
            for source, target in FLOWER_TRANSFERS:
                transfer(hosts, source, target, site.name)
        coord.run("1. install on the aggregator host", guides.block(AGGREGATOR, "Flower", "1. Certificates", 1))

        superlink = coord.start(procs, "2. superlink", guides.block(AGGREGATOR, "Flower", "2. Start the SuperLink"))
        for port in ("fleet", "control"):
            procs.wait_for_port(superlink, ports[port], 60)
        coord.run("3. app and registration", guides.block(AGGREGATOR, "Flower", "3. Write the Flower app"))
        for site in sites.values():
            site.start(procs, "3. supernode and worker", guides.block(COLLABORATOR, "Flower", "3. Start the SuperNode"))

        done = None
        for line in guides.block(AGGREGATOR, "Flower", "4. Run, follow, resume").splitlines():
            command = next((c for c in FLOWER_STEP4 if line.startswith(c)), None)
            assert command is not None, f"aggregator step 4: new line, say in FLOWER_STEP4 what to do with it: {line}"
            if command == "flwr run":
                out = coord.run("4. flwr run", line)
                run_id = re.search(r"run (\d+)", out)
                assert run_id, out
                coord.values["run_id"] = run_id.group(1)
            elif command == "flwr log":
                coord.run("4. flwr log", line.replace("flwr log", "flwr log --show", 1), timeout=60)
            elif command == "tail -f":
                done = _wait_for_done(coord.path(line.split()[2]), procs, TIMEOUT)
            elif command == "flwr ls":
                coord.run("4. flwr ls", line)
        assert done is not None and done["round"] == ROUNDS

        coord.run("6. the global model", guides.block(AGGREGATOR, "Flower", "6. The global model"))
    _assert_stopped(procs)

    run_dir = coord.root / "srv" / "fedsynth" / "run"
    assert (run_dir / "global" / "last.ckpt").is_file()
    # the guides' default: sites keep their validation losses, so no best.ckpt (as aggregator/README.md says)
    assert not (run_dir / "global" / "best.ckpt").exists()
    assert len(list((coord.cwd / "samples").glob("synthetic_*.png"))) == 16
    for site in sites.values():  # each hospital trained on its own images and kept its state
        assert list((site.root / "data" / "fedsynth" / "state").rglob("last.ckpt")), site.name
    guides.check_all_run([AGGREGATOR, COLLABORATOR], "Flower")
    guides.check_all_run([CERTS], None)
    print(f"Flower guides: {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------------------------------- OpenFL


def test_openfl_guides(tmp_path: Path, mri2d: dict[str, Path]) -> None:
    pytest.importorskip("openfl")
    pytest.importorskip("opacus")  # the hospitals require DP by default
    started = time.monotonic()
    guides = Guides()
    config = _tiny_config(tmp_path / "tiny.yaml")
    coord = Host("coordinator", tmp_path / "coordinator", {"agg_host": "localhost"},
                 _env(EDITOR=str(_editor(tmp_path, config, free_port()))))
    sites = {s: Host(s, tmp_path / f"site{i}", {"site": s, "agg_host": "localhost"}, _env(OMP_NUM_THREADS="1"))
             for i, s in enumerate(("hosp1", "hosp2"), start=1)}
    hosts = {"coordinator": coord, **sites}
    for site, brain in zip(sites.values(), _brains(mri2d), strict=True):
        _hospital_data(site.root / "data" / site.name, brain)

    coord.run("1. workspace and plan", guides.block(AGGREGATOR, "OpenFL", "1. Workspace and plan"))
    coord.run("2. CA and aggregator certificate", guides.block(AGGREGATOR, "OpenFL", "2. Certificate authority"))
    for site in sites.values():
        transfer(hosts, *OPENFL_TRANSFERS["workspace"], site.name)
        site.run("1. import", guides.block(COLLABORATOR, "OpenFL", "1. Import"))
        site.run("2. data", guides.block(COLLABORATOR, "OpenFL", "2. Point the plan"))
        site.run("3. certificate request", guides.block(COLLABORATOR, "OpenFL", "3. Certificate", 0))
        transfer(hosts, *OPENFL_TRANSFERS["request"], site.name)
        coord.values["name"] = site.name
        coord.run(f"3. sign {site.name}", guides.block(AGGREGATOR, "OpenFL", "3. Sign each site"))
        transfer(hosts, *OPENFL_TRANSFERS["signed"], site.name)
        site.run("3. import the signed certificate", guides.block(COLLABORATOR, "OpenFL", "3. Certificate", 1))

    with ProcessGroup(grace=5.0) as procs:
        names = [coord.start(procs, "4. aggregator", guides.block(AGGREGATOR, "OpenFL", "4. Run"))]
        names += [site.start(procs, "4. collaborator", guides.block(COLLABORATOR, "OpenFL", "4. Run"))
                  for site in sites.values()]
        try:  # the aggregator ends by itself after the last round, and tells the collaborators to stop
            procs.wait_all([procs.procs[n] for n in names], deadline=time.monotonic() + TIMEOUT)
        except Exception as err:
            raise AssertionError(f"the OpenFL federation did not finish: {err}") from None
    _assert_stopped(procs)

    coord.run("6. the global model", guides.block(AGGREGATOR, "OpenFL", "6. The global model"))
    workspace = coord.cwd
    assert (workspace / "global" / "last.ckpt").is_file() and (workspace / "final.ckpt").is_file()
    assert not (workspace / "global" / "best.ckpt").exists()  # sites keep their losses by default
    assert len(list((workspace / "samples").glob("synthetic_*.png"))) == 16
    for site in sites.values():  # each hospital trained on its own images (CSV left where it was)
        state = site.cwd / "local_state" / "fedsynth" / site.name
        assert list(state.rglob("last.ckpt")), site.name
    guides.check_all_run([AGGREGATOR, COLLABORATOR], "OpenFL")
    print(f"OpenFL guides: {time.monotonic() - started:.0f} s")
