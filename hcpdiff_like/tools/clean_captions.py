"""Normalise the tags (and captions) of a kohya fine-tune metadata JSON.

    python -m hcpdiff_like.tools.clean_captions IN_JSON OUT_JSON [--rules rules.yaml] [--overwrite]

Each entry's "tags" (comma-separated, e.g. from a WD14 / DeepDanbooru tagger) is cleaned in this order:
  1. underscores -> spaces (`long_hair` -> `long hair`; tags of 3 characters or fewer such as `^_^` and the
     rules' `keep_underscore` list are kept; --keep_underscores turns this off)
  2. rating tags removed (`rating:safe`, `rating_explicit`, ... and the words general, sensitive, questionable,
     explicit; the rules' `rating_tags` replaces that word list; --keep_rating_tags turns this off)
  3. the rules file: `regex` ([pattern, replacement] pairs, applied in order to each tag), then `replace`
     (exact tag -> new text; "" drops the tag, a comma splits it into several), then `remove` (exact tags)
  4. duplicates removed, first occurrence kept (--keep_duplicates turns this off)
"caption" lines get whitespace tidied and the rules' `caption_regex` pairs; --caption_as_tags cleans each
caption line like tags instead. The rules file is YAML or JSON, e.g.

    replace: {1girls: 1girl, blonde: blonde hair}
    remove: [simple background]
    regex: [['^(\\w+) hair (\\w+) eyes$', '\\1 hair, \\2 eyes']]
    caption_regex: [['\\banime anime\\b', 'anime']]
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..data.metadata_json import MetadataError, check_writable, read_metadata, write_metadata

DEFAULT_RATING_WORDS = ("general", "sensitive", "questionable", "explicit")
RATING_PREFIX = re.compile(r"^rating[:_ ]\s*\w+$", re.IGNORECASE)
RULE_KEYS = {"replace", "remove", "regex", "caption_regex", "rating_tags", "keep_underscore"}


class RulesError(ValueError):
    """A rules file that cannot be used; names the file and the key."""


@dataclass
class CleanRules:
    replace: dict[str, str] = field(default_factory=dict)
    remove: set[str] = field(default_factory=set)
    regex: list[tuple[re.Pattern, str]] = field(default_factory=list)
    caption_regex: list[tuple[re.Pattern, str]] = field(default_factory=list)
    rating_tags: set[str] = field(default_factory=lambda: set(DEFAULT_RATING_WORDS))
    keep_underscore: set[str] = field(default_factory=set)
    underscores: bool = True
    ratings: bool = True
    duplicates: bool = True

    def normalise(self, tag: str) -> str:
        """Step 1 on one tag (rule keys go through it too, so `long_hair` and `long hair` both match)."""
        tag = tag.strip()
        if not self.underscores or len(tag) <= 3 or tag in self.keep_underscore:
            return tag
        return re.sub(r"\s+", " ", tag.replace("_", " ")).strip()


def _pairs(value, name: str, where: str) -> list[tuple[re.Pattern, str]]:
    if not isinstance(value, list):
        raise RulesError(f"{where}: '{name}' must be a list of [pattern, replacement] pairs")
    pairs = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise RulesError(f"{where}: '{name}' entry {item!r} is not a [pattern, replacement] pair of strings")
        try:
            pairs.append((re.compile(item[0]), item[1]))
        except re.error as error:
            raise RulesError(f"{where}: '{name}' pattern {item[0]!r} is not a valid regex: {error}") from None
    return pairs


def _strings(value, name: str, where: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}: '{name}' must be a list of strings")
    return {v.strip() for v in value}


def load_rules(path: str | Path | None = None) -> CleanRules:
    """The default rules, updated from a YAML/JSON rules file (yaml.safe_load reads both)."""
    import yaml

    rules = CleanRules()
    if path is None:
        return rules
    path = Path(path)
    if not path.is_file():
        raise RulesError(f"rules file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RulesError(f"rules file {path} cannot be read as YAML/JSON: {error}") from None
    where = f"rules file {path}"
    if not isinstance(data, dict):
        raise RulesError(f"{where}: expected a mapping with keys {sorted(RULE_KEYS)}")
    unknown = sorted(set(data) - RULE_KEYS)
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {unknown}; known: {sorted(RULE_KEYS)}")
    if "replace" in data:
        if not isinstance(data["replace"], dict) or not all(
                isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in data["replace"].items()):
            raise RulesError(f"{where}: 'replace' must map tag -> replacement text")
        rules.replace = {k.strip(): (v or "") for k, v in data["replace"].items()}
    if "remove" in data:
        rules.remove = _strings(data["remove"], "remove", where)
    if "rating_tags" in data:
        rules.rating_tags = _strings(data["rating_tags"], "rating_tags", where)
    if "keep_underscore" in data:
        rules.keep_underscore = _strings(data["keep_underscore"], "keep_underscore", where)
    if "regex" in data:
        rules.regex = _pairs(data["regex"], "regex", where)
    if "caption_regex" in data:
        rules.caption_regex = _pairs(data["caption_regex"], "caption_regex", where)
    return rules


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def clean_tags(text: str, rules: CleanRules) -> str:
    tags = [rules.normalise(t) for t in _split(text)]
    if rules.ratings:
        ratings = {rules.normalise(t).lower() for t in rules.rating_tags}
        tags = [t for t in tags if not (RATING_PREFIX.match(t) or t.lower() in ratings)]
    for pattern, replacement in rules.regex:
        tags = [piece for t in tags for piece in _split(pattern.sub(replacement, t))]
    replace = {rules.normalise(k): v for k, v in rules.replace.items()}
    tags = [piece for t in tags for piece in (_split(replace[t]) if t in replace else [t])]
    remove = {rules.normalise(t) for t in rules.remove}
    tags = [t for t in tags if t not in remove]
    if rules.duplicates:
        tags = list(dict.fromkeys(tags))
    return ", ".join(tags)


def clean_caption(text: str, rules: CleanRules, as_tags: bool = False) -> str:
    lines = []
    for line in text.splitlines():
        if as_tags:
            line = clean_tags(line, rules)
        else:
            for pattern, replacement in rules.caption_regex:
                line = pattern.sub(replacement, line)
            line = re.sub(r"\s+", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def clean_metadata(metadata: dict[str, dict], rules: CleanRules, caption_as_tags: bool = False) -> tuple[dict, int]:
    """A cleaned copy of `metadata` and how many entries changed; other fields are kept."""
    cleaned, changed = {}, 0
    for key, entry in metadata.items():
        new = dict(entry)
        if isinstance(entry.get("tags"), str):
            new["tags"] = clean_tags(entry["tags"], rules)
        if isinstance(entry.get("caption"), str):
            new["caption"] = clean_caption(entry["caption"], rules, caption_as_tags)
        changed += new != entry
        cleaned[key] = new
    return cleaned, changed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hcpdiff_like.tools.clean_captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_json", help="metadata JSON to clean (e.g. from tools.merge_captions)")
    parser.add_argument("out_json", help="cleaned metadata JSON to write (may equal IN_JSON with --overwrite)")
    parser.add_argument("--rules", default=None, help="YAML/JSON file of replace / remove / regex rules")
    parser.add_argument("--keep_underscores", action="store_true", help="leave underscores in tags")
    parser.add_argument("--keep_rating_tags", action="store_true", help="leave rating tags in")
    parser.add_argument("--keep_duplicates", action="store_true", help="leave repeated tags in")
    parser.add_argument("--caption_as_tags", action="store_true", help="clean caption lines like tag lists")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_JSON if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_writable(args.out_json, args.overwrite)
        rules = load_rules(args.rules)
        rules.underscores, rules.ratings = not args.keep_underscores, not args.keep_rating_tags
        rules.duplicates = not args.keep_duplicates
        metadata = read_metadata(args.in_json)
        cleaned, changed = clean_metadata(metadata, rules, args.caption_as_tags)
        write_metadata(cleaned, args.out_json, overwrite=args.overwrite)
    except (MetadataError, RulesError, FileExistsError, IsADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_json}: {len(cleaned)} entries, {changed} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
