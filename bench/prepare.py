"""Throughput of `normtron prepare-data` against the tokenizer's own speed, with 1 and 2 workers, on a generated
corpus of real English text (Shakespeare's plays repeated, cut into ~3 KB JSON-lines documents).

    python bench/prepare.py                  # 300 MB corpus (and half of it, to show memory does not grow)
    python bench/prepare.py --mb 80 --workers 1 2

For each run it reports wall time, MB/s of document text end to end (and per worker), that per-worker rate as a
share of the ceiling — sentencepiece's own encode of the same documents in one process, without reading, JSON,
splitting or writing — the same per CPU second (which a shared, loaded machine distorts less), and the peak
resident memory (largest single process, and the whole process tree) and peak disk use of
the output directory next to its final size. A compressed (.jsonl.gz) copy of the corpus is prepared too when
the installed normtron reads .gz files. datatrove's DocumentTokenizer and Megatron's tools/preprocess_data.py are
not run: see the note the script prints.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC_CHARS = 3000
FILE_MB = 16  # generated files: several shards' worth of work for the workers
OTHER_TOOLS = ("datatrove (its DocumentTokenizer needs a Hugging Face tokenizer.json, so it would time a different "
               "tokenizer implementation) and Megatron-LM's tools/preprocess_data.py (not in the megatron-core "
               "wheel; it needs a Megatron-LM checkout and torch) are not run here")


def shakespeare_documents() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "trainer", "download-corpus", "shakespeare"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    docs = []
    for path in sorted(Path(out).glob("*.txt")):
        text = path.read_text(encoding="utf-8-sig")
        docs.extend(text[i:i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS))
    return docs


def write_corpus(root: Path, docs: list[str], mb: float, compress: bool) -> tuple[int, int]:
    """`mb` MB of JSON lines (the documents repeated) in files of FILE_MB MB; returns (bytes on disk, bytes of
    document text in UTF-8: the basis of every rate)."""
    root.mkdir(parents=True)
    target, written, text_bytes, i, n_file = mb * 1e6, 0, 0, 0, 0
    while written < target:
        name = root / (f"part{n_file:04d}.jsonl" + (".gz" if compress else ""))
        with (gzip.open(name, "wt", compresslevel=6) if compress else open(name, "w")) as f:
            size = 0
            while size < FILE_MB * 1e6 and written + size < target:
                line = json.dumps({"text": docs[i % len(docs)], "id": i}) + "\n"
                f.write(line)
                size += len(line.encode())
                text_bytes += len(docs[i % len(docs)].encode())
                i += 1
        written += size
        n_file += 1
    return sum(p.stat().st_size for p in root.iterdir()), text_bytes


def raw_encode_mb_s(tokenizer: Path, corpus: Path) -> tuple[float, float]:
    """sentencepiece's encode of the corpus's documents in one process, one thread: the ceiling per worker, as
    (MB/s of wall time, MB per CPU second)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in open(p)]
    n_bytes = sum(len(d.encode()) for d in docs)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(docs), 256):
        sp.encode(docs[i:i + 256], num_threads=1)
    return n_bytes / 1e6 / (time.perf_counter() - start), n_bytes / 1e6 / (time.process_time() - cpu)


class Sampler(threading.Thread):
    """Polls a process tree's resident memory and a directory's disk use every 0.1 s, keeping the peaks."""

    def __init__(self, pid: int, directory: Path):
        super().__init__(daemon=True)
        self.pid, self.directory, self.stop = pid, directory, threading.Event()
        self.peak_rss = self.peak_tree_rss = self.peak_disk = 0

    def run(self) -> None:
        while not self.stop.is_set():
            rss = [_rss(p) for p in _tree(self.pid)]
            self.peak_rss = max(self.peak_rss, *rss, 0)
            self.peak_tree_rss = max(self.peak_tree_rss, sum(rss))
            self.peak_disk = max(self.peak_disk, disk_bytes(self.directory))
            time.sleep(0.1)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def prepare(corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "trainer", "prepare-data", "--input", str(corpus), "--output", str(out),
           "--tokenizer", str(tokenizer), "--workers", str(workers), "--shard-size", f"{FILE_MB}MB"]
    out.mkdir(parents=True)
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    sampler = Sampler(proc.pid, out)
    sampler.start()
    log = proc.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare-data failed:\n{log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and its workers (waited for)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": sampler.peak_rss, "peak_tree_rss": sampler.peak_tree_rss,
            "peak_disk": sampler.peak_disk, "final_disk": disk_bytes(out)}


def reads_gzip() -> bool:
    from trainer.data import corpus

    return any(".gz" in str(s) for s in getattr(corpus, "TEXT_SUFFIXES", ())) or \
        "gz" in " ".join(getattr(corpus, "COMPRESSIONS", ()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB (default 300)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="sentencepiece vocabulary (default 8192)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args()
    from trainer.data.tokenizer import train_sentencepiece

    root = Path(args.keep or tempfile.mkdtemp(prefix="nt-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        docs = shakespeare_documents()
        tok = train_sentencepiece(iter(docs), args.vocab_size, 1, log=lambda *a: None)
        tok_path = root / "tokenizer.model"
        tok.save(tok_path)
        sizes = {"full": args.mb, "half": args.mb / 2}
        corpora = {}
        for label, mb in sizes.items():
            corpora[("jsonl", label)] = write_corpus(root / f"jsonl-{label}", docs, mb, compress=False)
        if reads_gzip():
            corpora[("jsonl.gz", "full")] = write_corpus(root / "jsonl.gz-full", docs, args.mb, compress=True)
        ceiling, ceiling_cpu = raw_encode_mb_s(tok_path, root / "jsonl-full")
        print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f} at the start; "
              f"tokenizer: sentencepiece BPE, vocab {args.vocab_size}; ceiling (sentencepiece encode, 1 process, "
              f"1 thread, same documents): {ceiling:.2f} MB/s, {ceiling_cpu:.2f} MB per CPU second\n")
        rows = []
        runs = [(("jsonl", "full"), w) for w in args.workers] + [(("jsonl", "half"), min(args.workers))]
        runs += [(("jsonl.gz", "full"), w) for w in args.workers if ("jsonl.gz", "full") in corpora]
        base = {}
        for (kind, label), workers in runs:
            in_bytes, text_bytes = corpora[(kind, label)]
            result = prepare(root / f"{kind}-{label}", root / f"out-{kind}-{label}-{workers}", tok_path, workers)
            shutil.rmtree(root / f"out-{kind}-{label}-{workers}")
            text_mb = text_bytes / 1e6  # rates in MB of document text, as the ceiling's
            rate = text_mb / result["seconds"]
            base.setdefault((kind, label), rate)
            rows.append([f"{kind}, {in_bytes / 1e6:.0f} MB on disk ({text_mb:.0f} MB of text)",
                         str(workers), f"{result['seconds']:.1f}", f"{rate:.2f}", f"{rate / workers:.2f}",
                         f"{100 * rate / workers / ceiling:.0f}%",
                         f"{text_mb / result['cpu_seconds']:.2f} ({100 * text_mb / result['cpu_seconds'] / ceiling_cpu:.0f}%)",
                         f"{rate / base[(kind, label)]:.2f}x",
                         f"{result['peak_rss'] / 2**20:.0f} / {result['peak_tree_rss'] / 2**20:.0f}",
                         f"{result['peak_disk'] / 1e6:.0f} / {result['final_disk'] / 1e6:.0f}"])
        header = ["corpus", "workers", "wall s", "MB/s", "MB/s per worker", "of ceiling",
                  "MB per CPU s (of ceiling)", "vs 1 worker",
                  "peak RSS MiB (process / tree)", "peak / final disk MB"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nceiling: {ceiling:.2f} MB/s, {ceiling_cpu:.2f} MB per CPU second, per process. CPU seconds count "
              f"every process of a run (start-up, reading, JSON, hashing, writing, the final checks). Not compared: {OTHER_TOOLS}."
              + ("" if reads_gzip() else " This normtron does not read .gz files yet: no compressed run."))
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
