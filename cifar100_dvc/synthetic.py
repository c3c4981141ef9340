"""Small synthetic datasets in the Hugging Face hub layout (parquet + README.md dataset card).

For tests, benchmarks and smoke runs without network: ``python -m tools.synthetic OUT_DIR``
writes one that ``fetch.dataset`` can point at.

Image colors encode the labels, so the classes are learnable: fine label f = 5 * coarse + k;
red encodes coarse % 5, green coarse // 5 and blue k. A few images come in other modes
(L, LA, RGBA, P, I;16, CMYK) and sizes, as real-world data does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

NUM_FINE = 100
NUM_COARSE = 20
FINE_NAMES = [f"fine_{index:02d}" for index in range(NUM_FINE)]
COARSE_NAMES = [f"coarse_{index:02d}" for index in range(NUM_COARSE)]
ODD_MODES = ("L", "LA", "RGBA", "P", "I;16", "CMYK")
HUB_TYPOS = {26: "cra"}  # fine class -> its name on the hub's card for uoft-cs/cifar100 (26 is crab)


def hub_fine_names() -> list[str]:
    """FINE_NAMES with the hub card's typos for uoft-cs/cifar100 (fine class 26 named "cra")."""
    return [HUB_TYPOS.get(index, name) for index, name in enumerate(FINE_NAMES)]


@dataclass(frozen=True)
class Row:
    encoded: bytes
    fine_label: int
    coarse_label: int


def class_color(fine_label: int) -> np.ndarray:
    coarse, k = divmod(fine_label, 5)
    return np.array([40 + 45 * (coarse % 5), 40 + 55 * (coarse // 5), 30 + 48 * k], np.float64)


def make_image(fine_label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy image of the class's color, [size, size, 3] uint8."""
    noise = rng.normal(0.0, 6.0, (size, size, 3))
    return np.clip(class_color(fine_label) + noise, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, mode: str = "RGB", image_format: str = "PNG") -> bytes:
    image = Image.fromarray(pixels, "RGB")
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), np.uint16) * 257
        image = Image.fromarray(gray)  # uint16 -> mode I;16
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode == "CMYK" else image_format)
    return buffer.getvalue()


def make_rows(num_rows: int, seed: int, odd_every: int = 0) -> list[Row]:
    """Balanced over fine labels; every ``odd_every``-th row has an odd mode or size."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_rows):
        fine = index % NUM_FINE
        mode, size = "RGB", 32
        if odd_every and index % odd_every == 1:
            variant = (index // odd_every) % (len(ODD_MODES) + 2)
            if variant < len(ODD_MODES):
                mode = ODD_MODES[variant]
            else:
                size = (24, 40)[variant - len(ODD_MODES)]
        rows.append(Row(encode(make_image(fine, rng, size), mode), fine, fine // 5))
    order = rng.permutation(num_rows)
    return [rows[i] for i in order]


def card(
    splits: list[str], label_columns=("fine_label", "coarse_label"), plain_int_columns=(), class_names: dict | None = None
) -> str:
    """The README.md dataset card: features (class labels with names) and where each split is."""
    lines = ["---", "dataset_info:", "  features:", "  - name: img", "    dtype: image"]
    names = {"fine_label": FINE_NAMES, "coarse_label": COARSE_NAMES, **(class_names or {})}
    for column in label_columns:
        if column in plain_int_columns:  # declared as a bare integer: not a class label
            lines += [f"  - name: {column}", "    dtype: int64"]
            continue
        lines += [f"  - name: {column}", "    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{index}': {name}" for index, name in enumerate(names[column])]
    lines += ["configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += ["---", "# synthetic CIFAR-100-like dataset for tests", ""]
    return "\n".join(lines)


def write_hub_dataset(
    directory: Path,
    splits: dict[str, list[Row]],
    label_columns=("fine_label", "coarse_label"),
    plain_int_columns=(),
    class_names: dict | None = None,
) -> Path:
    """Write ``splits`` as parquet files plus a dataset card, like the hub repository.

    ``class_names`` replaces a column's names in the card, e.g. ``{"fine_label": names}`` with
    a typo that the hub's card carries (``hub_fine_names()``).
    """
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        columns = {
            "img": pa.array(
                [{"bytes": row.encoded, "path": None} for row in rows],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
        }
        for column in label_columns:
            columns[column] = pa.array([getattr(row, column) for row in rows], type=pa.int64())
        pq.write_table(pa.table(columns), directory / "data" / f"{split}-00000-of-00001.parquet")
    (directory / "README.md").write_text(card(list(splits), label_columns, plain_int_columns, class_names))
    return directory


def write_image_folder(
    directory: Path, splits: dict[str, int], class_names: list[str], size: tuple[int, int] = (40, 30), seed: int = 0
) -> Path:
    """A folder of JPEG images with one sub-folder per class, as a user's photos are laid out:
    ``splits`` {"train": n, "test": m} puts n (m) images of each class under ``train/`` (``test/``);
    {"": n} puts them directly under ``directory``. Colours encode the class, as in ``make_image``;
    ``size`` is (width, height), not square, so that the pipeline has to resize and crop."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, per_class in splits.items():
        for index, name in enumerate(class_names):
            folder = directory / split / name if split else directory / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                pixels = make_image(5 * index, rng, size=max(width, height))[:height, :width]
                Image.fromarray(pixels).save(folder / f"{number:03d}.jpg", quality=90)
    return directory
