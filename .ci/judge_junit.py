"""Judge a pytest JUnit report for .ci/run: fail on failures, errors, or when no test ran."""
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
ran = n["tests"] - n["skipped"]
print(f"[ci] {n['tests']} tests: {ran} ran, {n['skipped']} skipped, {n['failures']} failed, {n['errors']} errors")
if n["failures"] or n["errors"]:
    sys.exit("[ci] FAIL: failures or errors")
if ran == 0:
    sys.exit("[ci] FAIL: no test ran (none collected, or all skipped/deselected)")
if int(sys.argv[2]) != 0:
    sys.exit(f"[ci] FAIL: make test exited {sys.argv[2]} although the report counts no failure")
print("[ci] PASS")
