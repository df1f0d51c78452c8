#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut changes the judging, metrics and selection code one small edit at a time
# and runs the fast tests that cover each edit; a mutant that leaves them green "survived".
#   scripts/mutate.sh            -> installs mutmut into the venv, runs, prints the score and the survivors
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PYSTEER_VENV:-.venv}
"$venv/bin/python" -m pip install -q --disable-pip-version-check "mutmut==3.8.1"
rm -rf mutants
"$venv/bin/mutmut" run --max-children "${MUTATE_JOBS:-2}" || true
"$venv/bin/mutmut" results --all true > mutants/results.txt || true
"$venv/bin/python" - <<'PY'
import collections, re
counts = collections.Counter()
survivors = []
for line in open("mutants/results.txt"):
    m = re.match(r"\s*(\S+): (\S+)", line)
    if m:
        counts[m.group(2)] += 1
        if m.group(2) == "survived":
            survivors.append(m.group(1))
killed, total = counts["killed"], sum(counts.values())
print(dict(counts))
print(f"mutation score: {killed}/{total} killed ({killed / max(total, 1):.1%})")
print("survivors:", *survivors, sep="\n  ")
PY
