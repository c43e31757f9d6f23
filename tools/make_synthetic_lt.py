"""Write an ImageNet-LT- or iNaturalist-2018-shaped data set: list files and synthetic JPEGs at
the real relative paths, so the real workload can be rehearsed where the images are not.

    # ImageNet-LT: the real val/test lists, a train list from the real per-class counts
    python tools/make_synthetic_lt.py --out /data/synth_inlt --profile imagenet_lt \
        --counts ImageNet_LT_train_counts.json --list ImageNet_LT_val.txt.gz \
        --list ImageNet_LT_test.txt.gz --size tiny --jobs 8
    # iNaturalist 2018: 437,513 train images over 8,142 classes, the real val list
    python tools/make_synthetic_lt.py --out /data/synth_inat --profile inat2018 \
        --list iNaturalist18_val.txt.gz --lists-only

--list FILE (.txt or .txt.gz, repeatable) copies a real list into OUT (byte for byte unless
--max-per-class cuts it) and makes an image for each of its lines. --profile adds the splits
the lists do not give: imagenet_lt: train from --counts (a JSON list of per-class counts),
val 20 and test 50 per class; inat2018: train with the published totals (437,513 images,
8,142 classes, max 1,000, min 2; --counts replaces the curve), val 3 per class (iNat has no
test split). Generated paths follow the real ones: train/<wnid>/<wnid>_<k>.JPEG,
val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG, train_val2018/<supercategory>/<label>/<md5>.jpg,
with the class folders taken from the given lists where they name them.

Images (--size): tiny (16-32 px, class-coloured gradients: CI) or imagenet (photo-like
collages of the photographs matplotlib / scikit-learn / scikit-image ship, 500x375, 375x500
or 500x333 -- max side 800 for iNat -- with a class tint and a little noise, JPEG quality
92-97: ~110 KB each, as ImageNet's). Each image depends only on --seed and its path, is
written atomically (.part, then renamed), and an existing complete JPEG is skipped, so an
interrupted run resumes where it stopped. --jobs processes; a tqdm bar.
Writes OUT/<list>.txt and OUT/images/<path>; prints the data.* overrides to use.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import sys
import time
import zlib

import numpy as np


from ltrainer.data_pipelines.list_format import parse_bytes  # noqa: E402

PER_CLASS = {"imagenet_lt": {"val": 20, "test": 50}, "inat2018": {"val": 3}}
NAMES = {"imagenet": "ImageNet_LT_{}.txt", "inat": "iNaturalist18_{}.txt"}
INAT_SUPERCATEGORIES = ("Actinopterygii", "Amphibia", "Animalia", "Arachnida", "Aves",
                        "Bacteria", "Chromista", "Fungi", "Insecta", "Mammalia", "Mollusca",
                        "Plantae", "Protozoa", "Reptilia")
SHAPES = {"imagenet": ((500, 375), (375, 500), (500, 333)), "inat": ((800, 600), (600, 800),
                                                                      (800, 533))}
PHOTOS = (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
          ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
          ("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"),
          ("skimage", "data/chelsea.png"), ("skimage", "data/rocket.jpg"))


class UserError(ValueError):
    """Bad input: printed as one line, exit 2."""


# ----------------------------------------------------------------------------- counts, paths

def inat2018_counts(seed: int = 0) -> np.ndarray:
    """Per-class train counts with iNaturalist 2018's published totals (8,142 classes, 437,513
    images, max 1,000, min 2): log n falls from log 1000 to log 2 as (rank / C)^p, p fitted to
    the total, the counts in a seeded class order (real labels are not sorted by size). The
    real per-class counts are not published with the lists, so the curve between the ends is
    our choice."""
    classes, total, hi, lo = 8142, 437_513, 1000, 2
    x = np.arange(classes) / (classes - 1)
    a, b = 0.01, 10.0
    for _ in range(100):
        p = (a + b) / 2
        a, b = (p, b) if np.exp(np.log(hi) - np.log(hi / lo) * x ** p).sum() < total else (a, p)
    n = np.exp(np.log(hi) - np.log(hi / lo) * x ** p)
    counts = np.floor(n).astype(np.int64)
    extra = np.argsort(-(n - counts), kind="stable")[:total - counts.sum()]
    counts[extra] += 1
    return np.random.default_rng(seed).permutation(counts)


def read_json(path: str, expected: str):
    """A JSON file's content, or a UserError naming the file and what was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it ({exc}); expected {expected}") from None


def read_counts(path: str) -> np.ndarray:
    """A JSON list of per-class counts, or a {"counts": [...]} summary (make_lt_lists.py)."""
    data = read_json(path, "a JSON list of per-class counts")
    data = data.get("counts") if isinstance(data, dict) else data
    if not isinstance(data, list) or not data or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in data):
        raise UserError(f"{path}: expected a JSON list of non-negative integers (one count per "
                        f"class, label order)")
    return np.asarray(data, dtype=np.int64)


def class_folders(lines, style: str) -> dict:
    """label -> the class folder the given lists use (ImageNet wnid, iNat supercategory)."""
    out = {}
    for path, label in lines:
        parts = path.split("/")
        if style == "imagenet" and len(parts) == 3 and parts[0] in ("train", "val"):
            out.setdefault(label, parts[1])
        elif style == "inat" and len(parts) == 4 and parts[0] == "train_val2018":
            out.setdefault(label, parts[1])
    return out


def generated_lines(style: str, split: str, counts, folders: dict, taken: set, seed: int):
    """(path, label) lines of a generated split, at paths no given list uses."""
    lines, serial = [], 0
    for label, n in enumerate(np.asarray(counts).tolist()):
        k = 0
        for _ in range(n):
            while True:
                k += 1
                if style == "inat":
                    sup = folders.get(label) or INAT_SUPERCATEGORIES[label % 14]
                    digest = hashlib.md5(f"{seed}:{split}:{label}:{k}".encode()).hexdigest()
                    path = f"train_val2018/{sup}/{label}/{digest}.jpg"
                elif split == "test":
                    serial += 1
                    path = f"val/{folders.get(label, f'n{label:08d}')}/" \
                           f"ILSVRC2012_val_{serial:08d}.JPEG"
                else:
                    wnid = folders.get(label, f"n{label:08d}")
                    path = f"train/{wnid}/{wnid}_{k}.JPEG"
                if path not in taken:
                    break
            taken.add(path)
            lines.append((path, label))
    return lines


def read_given_list(path: str, cap: int) -> tuple[str, list]:
    """A real list (gzipped or not) as (text, lines), cut to `cap` lines per class if cap > 0."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read list ({exc})") from None
    parsed = parse_bytes(path, data)
    if parsed.problems:
        raise UserError(parsed.problems[0])
    lines = list(zip(parsed.paths, parsed.labels.tolist()))
    if cap <= 0:
        return data.decode("utf-8-sig"), lines
    kept, seen = [], {}
    for path_label in lines:
        seen[path_label[1]] = seen.get(path_label[1], 0) + 1
        if seen[path_label[1]] <= cap:
            kept.append(path_label)
    return "".join(f"{p} {y}\n" for p, y in kept), kept


def write_if_changed(path: str, text: str) -> bool:
    """Write atomically unless the file already holds exactly this text."""
    data = text.encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    return True


# ----------------------------------------------------------------------------- images

_STATE: dict = {}


def _photos() -> list:
    """The photographs installed packages ship (found without importing the packages)."""
    from PIL import Image

    found = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], rel)
        if os.path.isfile(path):
            with Image.open(path) as img:
                found.append(img.convert("RGB"))
    if not found:
        raise UserError("--size imagenet needs a photograph to cut from: none of "
                        + ", ".join(f"{p}/{r}" for p, r in PHOTOS) + " is installed")
    return found


def _init(root: str, size: str, style: str, seed: int):
    """Per-process state: the photographs and one block of noise that images take slices of
    (drawing fresh noise per image would cost more than encoding a tiny JPEG)."""
    noise = np.random.default_rng([seed, 1]).integers(-12, 13, 1 << 22, dtype=np.int16)
    colours = np.random.default_rng([seed, 2]).integers(0, 256, (1 << 16, 2, 3))
    _STATE.update(root=root, size=size, style=style, seed=seed, noise=noise,
                  colours=colours.astype(np.float32),
                  photos=_photos() if size == "imagenet" else [])


def _noise(key: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    start = key % (len(_STATE["noise"]) - n)
    return _STATE["noise"][start:start + n].reshape(shape)


def render(path: str, label: int) -> bytes:
    """The JPEG bytes of one image: a function of (seed, path, label) only."""
    from PIL import Image

    key = zlib.crc32(f"{_STATE['seed']}:{path}".encode())
    colours = _STATE["colours"][label % len(_STATE["colours"])]   # the class's two colours
    if _STATE["size"] == "tiny":
        w, h = 16 + key % 17, 16 + (key >> 8) % 17
        t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None] if label % 2 else \
            np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        a = colours[0] * (1 - t) + colours[1] * t + 1.5 * _noise(key >> 4, (h, w, 3))
        quality = 90
    else:
        rng = np.random.default_rng([_STATE["seed"], key])
        w, h = SHAPES[_STATE["style"]][int(rng.choice(3, p=(0.6, 0.2, 0.2)))]
        canvas = Image.new("RGB", (w, h))
        xs, ys = (0, w // 2, w), (0, h // 2, h)
        for i in range(2):
            for j in range(2):
                tw, th = xs[i + 1] - xs[i], ys[j + 1] - ys[j]
                photo = _STATE["photos"][int(rng.integers(len(_STATE["photos"])))]
                s = min(rng.uniform(1.0, 2.5), photo.width / tw, photo.height / th)
                cw, ch = int(tw * s), int(th * s)
                x = int(rng.integers(photo.width - cw + 1))
                y = int(rng.integers(photo.height - ch + 1))
                tile = photo.crop((x, y, x + cw, y + ch)).resize((tw, th), Image.BILINEAR)
                if rng.random() < 0.5:
                    tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
                canvas.paste(tile, (xs[i], ys[j]))
        tint = 0.75 + colours[0] / 510.0           # the class's tint: 0.75-1.25 per channel
        a = np.asarray(canvas, dtype=np.float32) * tint + _noise(key >> 4, (h, w, 3))
        quality = int(rng.integers(92, 98))
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def complete(path: str) -> bool:
    """A JPEG already written in full (ends with the end-of-image marker)."""
    try:
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"
    except OSError:
        return False


def _write_chunk(chunk) -> tuple[int, int, int]:
    """(written, skipped, bytes written) for a chunk of (path, label)."""
    written = skipped = nbytes = 0
    for rel, label in chunk:
        full = os.path.join(_STATE["root"], rel)
        if complete(full):
            skipped += 1
            continue
        data = render(rel, label)
        with open(full + ".part", "wb") as f:
            f.write(data)
        os.replace(full + ".part", full)
        written, nbytes = written + 1, nbytes + len(data)
    return written, skipped, nbytes


def write_images(root: str, items: list, size: str, style: str, seed: int, jobs: int):
    """Write every (path, label) image under root, in parallel; returns (written, skipped,
    bytes)."""
    from tqdm import tqdm

    for folder in sorted({os.path.dirname(p) for p, _ in items}):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    chunks = [items[i:i + 256] for i in range(0, len(items), 256)]
    totals = np.zeros(3, dtype=np.int64)
    with tqdm(total=len(items), unit="img", desc="images", mininterval=1.0) as bar:
        if jobs <= 1:
            _init(root, size, style, seed)
            results = map(_write_chunk, chunks)
            for chunk, res in zip(chunks, results):
                totals += res
                bar.update(len(chunk))
        else:
            with multiprocessing.get_context("fork").Pool(
                    jobs, _init, (root, size, style, seed)) as pool:
                for res in pool.imap_unordered(_write_chunk, chunks):
                    totals += res
                    bar.update(res[0] + res[1])
    return tuple(int(v) for v in totals)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (lists; images under images/)")
    p.add_argument("--list", action="append", default=[], help="a real list file (.txt[.gz])")
    p.add_argument("--profile", choices=sorted(PER_CLASS), help="generate the missing splits")
    p.add_argument("--counts", help="per-class train counts (JSON list)")
    p.add_argument("--size", choices=("tiny", "imagenet"), default="tiny")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="at most this many images per class in every split (0: all)")
    p.add_argument("--lists-only", action="store_true", help="write the lists, no images")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def role(path: str) -> str:
    name = os.path.basename(path).lower()
    return next((r for r in ("train", "val", "test") if r in name), "list")


def build_lists(args) -> dict:
    """name -> (split role, text, lines) of every list to write."""
    out = {}
    for path in args.list:
        name = os.path.basename(path)[:-3] if path.endswith(".gz") else os.path.basename(path)
        text, lines = read_given_list(path, args.max_per_class)
        out[name] = (role(path), text, lines)
    if not args.profile:
        if args.counts:
            raise UserError("--counts needs --profile (imagenet_lt or inat2018)")
        return out
    style = "inat" if args.profile == "inat2018" else "imagenet"
    if args.counts:
        train = read_counts(args.counts)
    elif args.profile == "inat2018":
        train = inat2018_counts(args.seed)
    else:
        raise UserError("--profile imagenet_lt needs --counts (e.g. ImageNet_LT_train_counts."
                        "json: the official train split's 1,000 per-class counts)")
    given = [line for _, _, lines in out.values() for line in lines]
    folders, taken = class_folders(given, style), {p for p, _ in given}
    wanted = {"train": train, **{s: np.full(len(train), n) for s, n in
                                 PER_CLASS[args.profile].items()}}
    for split, counts in wanted.items():
        if any(r == split for r, _, _ in out.values()):
            continue
        if args.max_per_class > 0:
            counts = np.minimum(counts, args.max_per_class)
        lines = generated_lines(style, split, counts, folders, taken, args.seed)
        out[NAMES[style].format(split)] = (split, "".join(f"{p} {y}\n" for p, y in lines), lines)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        os.makedirs(args.out, exist_ok=True)
        lists = build_lists(args)
        if not lists:
            raise UserError("nothing to write: give --list FILE and/or --profile")
    except UserError as exc:
        print(f"make_synthetic_lt: {exc}", file=sys.stderr)
        return 2
    keys = []
    for name, (split, text, lines) in lists.items():
        path = os.path.join(args.out, name)
        changed = write_if_changed(path, text)
        classes = len({y for _, y in lines})
        print(f"{path}: {len(lines):,} lines, {classes:,} classes"
              f"{'' if changed else ' (unchanged)'}")
        if split in ("train", "val", "test"):
            keys.append(f"data.{split}_list={path}")
    root = os.path.join(args.out, "images")
    if not args.lists_only:
        items = list(dict.fromkeys((p, y) for _, _, lines in lists.values() for p, y in lines))
        style = "inat" if items and items[0][0].startswith("train_val2018/") else "imagenet"
        t0 = time.perf_counter()
        written, skipped, nbytes = write_images(root, items, args.size, style, args.seed,
                                                max(1, args.jobs))
        took = time.perf_counter() - t0
        mean = f", {nbytes / written / 1e3:.1f} KB each" if written else ""
        print(f"{root}: {written:,} images written{mean}, {skipped:,} already complete, "
              f"{took:.1f} s ({len(items) / max(took, 1e-9):,.0f} images/s, --jobs {args.jobs})")
    print(f"done in {time.perf_counter() - start:.1f} s; use: data.root={root} " + " ".join(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
