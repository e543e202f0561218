"""Print, from pytest's JUnit XML, the outcome of every test of the production
paths CI exists to exercise (vLLM, docker compose), by name: a skip there is
visible at a glance, and so is a pass."""

import sys
import xml.etree.ElementTree as ElementTree

WATCHED = ("test_vllm_", "test_compose_smoke")


def outcome(case: ElementTree.Element) -> str:
    for kind in ("failure", "error", "skipped"):
        if case.find(kind) is not None:
            return kind
    return "passed"


def main(path: str) -> None:
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        if any(name in module for name in WATCHED):
            print(f"{outcome(case):>8}  {module.rsplit('.', 1)[-1]}::{case.get('name')}")


if __name__ == "__main__":
    main(sys.argv[1])
