"""The README is the code's twin: every flag it shows exists in one of the project's commands, and the
commands it names for the two-command setup are the Makefile's."""
import re

from tests.conftest import ROOT, run_script

SCRIPTS = ["Generation/TrainGen/train.py", "Generation/TrainGen/generate.py", "Generation/TrainGen/demo.py",
           "eval/obj_eval/run_evaluation.py", "eval/obj_eval/run_utility.py", "eval/obj_eval/generate_report.py", "eval/obj_eval/metrics/fid.py",
           "eval/obj_eval/metrics/lpips_eval.py", "eval/obj_eval/metrics/ms_ssim.py",
           "eval/obj_eval/metrics/mae_psnr.py", "bench/benchmark.py"]
# flags of other programs the README shows (sbatch, pip, torchrun, huggingface-cli)
FOREIGN = {"--account", "--export", "--constraint", "--signal", "--dependency", "--no-deps", "--nproc_per_node",
           "--local-dir"}
FLAG = re.compile(r"--[a-z][a-z0-9_-]*")


def test_every_flag_in_the_readme_exists():
    known = set(FOREIGN)
    from medgen.cli import COMMANDS
    calls = [(script,) for script in SCRIPTS] + [("medgen/cli.py", name) for name in COMMANDS]
    for call in calls:
        res = run_script(*call, "--help")
        assert res.returncode == 0, f"{call} --help: {res.stderr[-500:]}"
        known |= set(FLAG.findall(res.stdout))
    for page in DOCS:
        shown = set(FLAG.findall(page.read_text()))
        assert shown - known == set(), page.name


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS[1:]:
        assert f"(docs/{page.name})" in readme, page.name
    link = re.compile(r"\]\(([\w./-]+\.md)(?:#[^)]*)?\)")          # markdown links to pages
    for page in DOCS:
        for target in link.findall(page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_readme_two_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
