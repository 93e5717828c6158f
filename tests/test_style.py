"""The house rules that a reader relies on: one shape-suffix legend for the whole package."""

import re
from pathlib import Path

import hetlm_jax

PACKAGE = Path(hetlm_jax.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "scripts").glob("*.py"))
# A name that ends with a shape: lower-case words, then _AxB... (e.g. nll_KxU, x_BxTxD, tokens_BxT1, mask_Bx1xTxS).
SUFFIX = re.compile(r"\b[a-z][a-z0-9_]*?_((?:[A-Z][A-Z0-9]*|1)(?:x(?:[A-Z][A-Z0-9]*|1))*)\b")


def _legend() -> set[str]:
  """The axis letters the package docstring defines: the first word of each of its legend's entries."""
  block = hetlm_jax.__doc__.split("means the same axis everywhere:")[1]
  return set(re.findall(r"(?:^|\s{2,})([A-Z][A-Z0-9]*|1)\s{2}", block, re.M)) | set(re.findall(r"\(([A-Z]\d): ", block))


def test_the_legend_names_every_axis_letter_once():
  letters = _legend()
  assert {"U", "K", "B", "T", "T1", "V", "D", "N", "R", "A", "H2", "KD", "1"} <= letters, sorted(letters)


def test_every_shape_suffix_in_the_package_and_scripts_uses_the_legends_letters():
  letters, strays = _legend(), []
  for path in SOURCES:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#")[0]
      for suffix in SUFFIX.findall(code):
        unknown = [axis for axis in suffix.split("x") if axis not in letters]
        if unknown:
          strays.append(f"{path.relative_to(PACKAGE.parent)}:{number} _{suffix} ({', '.join(unknown)})")
  assert not strays, "axis letters not in hetlm_jax/__init__.py's legend:\n" + "\n".join(strays)
