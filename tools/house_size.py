"""Lines of src/lomar at two revisions, and how many of today's lines hold features added since.

Issue 19 asks for a package smaller than at b5a1713 "at equal features". Features landed after
that revision (detection, segmentation, compose-digits, the header checks, ...), so the raw counts
do not compare. This script counts, at ``--head``:

- every line of the modules that exist only for a new feature (``FEATURE_MODULES``);
- elsewhere, per commit that added a feature (``FEATURE_COMMITS``), the lines ``git blame -w -M -C``
  still attributes to it, but never more than it added net outside those modules (a feature
  commit that also rewrote older lines is not credited with the rewrite). A feature line
  rewritten since by a restructuring commit counts as restructuring, so the feature share is a
  lower bound. Commits that mixed a feature with restructuring (``--preset demo|paper`` came with
  the run-folder set-up; the whole-graph compiled step rewrote BEiT's loss) are not counted.

"Equal features" is then the head's lines minus the feature lines, against the base's lines.
Usage: ``python tools/house_size.py [--base REV] [--head REV]`` from the repository root.
"""

from __future__ import annotations

import argparse
import collections
import subprocess

FEATURE_MODULES = {
    "cli/compose.py": "compose-digits", "data/compose.py": "compose-digits",
    "cli/detect.py": "detect", "data/coco.py": "detect", "eval/coco.py": "detect",
    "integrations/detection.py": "detect", "models/mask_rcnn.py": "detect", "train/detect.py": "detect",
    "train/detect_config.py": "detect",
    "cli/segment.py": "segment", "data/segmentation.py": "segment", "eval/segmentation.py": "segment",
    "integrations/segmenter.py": "segment", "models/segmenter.py": "segment", "models/upernet.py": "segment",
    "train/segment.py": "segment",
    "train/segment_config.py": "segment",
    "data/headers.py": "image-header checks",
    "checkpoints/formats_dense.py": "load_model of detectors and segmenters",
    "cli/predict.py": "predict", "eval/predict.py": "predict",
}
FEATURE_COMMITS = {
    "a3d7f5a": "detect", "326d424": "detect", "1d14b8e": "detect",
    "e4cd74b": "segment", "9f41ad3": "segment", "e143b6a": "segment", "7309d54": "segment", "6bc7405": "segment",
    "92bc3e6": "detect", "8a12020": "compose-digits",
    "37b82b2": "image-header checks", "1e26e44": "image-header checks",
    "89ad600": "tokenizer file checks",
    "b97cb9a": "method recipes", "e5f9967": "window placement", "6bc31fe": "study presets",
    "5d43343": "MAE linear-probe protocol", "439e12e": "BEiT exports for timm",
}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def python_files(rev: str) -> list[str]:
    return [p for p in git("ls-tree", "-r", "--name-only", rev, "src/lomar").split() if p.endswith(".py")]


def blamed_lines(rev: str, path: str) -> list[str]:
    """The short commit of each line of ``path`` at ``rev``."""
    out = git("blame", "-w", "-M", "-C", "--line-porcelain", rev, "--", path)
    return [line[:7] for line in out.splitlines()
            if len(line) > 41 and line[40] == " " and all(c in "0123456789abcdef" for c in line[:40])]


def net_added(commit: str) -> int:
    """Lines ``commit`` added minus lines it removed in src/lomar, outside the feature modules."""
    net = 0
    for line in git("show", "--numstat", "--format=", commit, "--", "src/lomar").splitlines():
        added, removed, path = line.split("\t")
        if path.removeprefix("src/lomar/") not in FEATURE_MODULES:
            net += int(added) - int(removed)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="b5a1713", help="revision the issue measured (default: b5a1713)")
    parser.add_argument("--head", default="HEAD", help="revision to measure (default: HEAD)")
    args = parser.parse_args()
    base = sum(len(git("show", f"{args.base}:{p}").splitlines()) for p in python_files(args.base))
    features: collections.Counter[str] = collections.Counter()
    surviving: collections.Counter[str] = collections.Counter()
    head = 0
    for path in python_files(args.head):
        module = path.removeprefix("src/lomar/")
        commits = blamed_lines(args.head, path)
        head += len(commits)
        if module in FEATURE_MODULES:
            features[FEATURE_MODULES[module]] += len(commits)
        else:
            surviving.update(c for c in commits if c in FEATURE_COMMITS)
    for commit, label in FEATURE_COMMITS.items():
        features[label] += max(0, min(surviving[commit], net_added(commit)))
    print(f"src/lomar at {args.base}: {base} lines")
    print(f"src/lomar at {args.head}: {head} lines")
    for label, count in features.most_common():
        print(f"  {count:6d}  {label}")
    added = sum(features.values())
    print(f"features added since {args.base}: {added} lines")
    print(f"at equal features: {head - added} lines ({100 * (head - added) / base - 100:+.1f} % against {base})")


if __name__ == "__main__":
    main()
