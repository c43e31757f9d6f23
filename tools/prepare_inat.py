"""Write the iNaturalist 2018 list files from the released annotation JSONs.

    python tools/prepare_inat.py --train-json /data/inat2018/train2018.json \
        --val-json /data/inat2018/val2018.json --out /data/inat2018

train2018.json / val2018.json are COCO-style: "images" ({id, file_name}), "annotations"
({image_id, category_id}) and "categories" ({id}). Each image becomes one line
"<file_name> <category_id>" (e.g. "train_val2018/Plantae/7291/<hash>.jpg 7291", relative to
the folder that holds train_val2018/), in the JSON's image order, as classifier-balancing made
iNaturalist18_train.txt / iNaturalist18_val.txt. An image without exactly one category, or a
category id outside the categories, stops with the file and the image id, before anything is
written. Prints whether each list is byte-identical to the official one (git blob SHA-1).
iNaturalist 2018 has no test split: the paper reports the val split.
"""
from __future__ import annotations

import argparse
import os
import sys


from ltrainer.data_pipelines.list_check import OFFICIAL  # noqa: E402
from ltrainer.data_pipelines.list_format import git_blob_sha1  # noqa: E402
from ltrainer.tools.make_synthetic_lt import UserError, read_json  # noqa: E402

OUTPUTS = {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"}


def list_lines(json_path: str) -> tuple[str, int]:
    """(the list's text, the number of categories) of one annotation file."""
    data = read_json(json_path, "iNaturalist 2018's COCO-style annotation JSON")
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{json_path}: expected the keys images, annotations and categories; "
                        f"missing {', '.join(missing)}")
    try:
        categories = {int(c["id"]) for c in data["categories"]}
        labels: dict = {}
        for a in data["annotations"]:
            labels.setdefault(a["image_id"], set()).add(int(a["category_id"]))
        images = [(im["id"], im["file_name"]) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{json_path}: malformed entry ({exc!r}); expected images with id and "
                        f"file_name, annotations with image_id and category_id, categories "
                        f"with id") from None
    lines = []
    for image_id, name in images:
        found = labels.get(image_id, set())
        if len(found) != 1:
            raise UserError(f"{json_path}: image id {image_id} ({name}) has "
                            f"{len(found)} categories {sorted(found)}; expected exactly one")
        (label,) = found
        if label not in categories or label < 0:
            raise UserError(f"{json_path}: image id {image_id} ({name}): category_id {label} is "
                            f"not among the {len(categories)} categories")
        if not isinstance(name, str) or not name or name != name.strip() or "\n" in name:
            raise UserError(f"{json_path}: image id {image_id}: file_name {name!r} cannot be a "
                            f"list path (leading/trailing space or a newline)")
        lines.append(f"{name} {label}\n")
    if not lines:
        raise UserError(f"{json_path}: no images")
    return "".join(lines), len(categories)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-json", required=True, help="train2018.json")
    p.add_argument("--val-json", required=True, help="val2018.json")
    p.add_argument("--out", required=True, help="folder for the two list files")
    args = p.parse_args(argv)
    try:
        texts = {split: list_lines(path) for split, path in
                 (("train", args.train_json), ("val", args.val_json))}
    except UserError as exc:
        print(f"prepare_inat: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for split, (text, n_categories) in texts.items():
        path = os.path.join(args.out, OUTPUTS[split])
        data = text.encode()
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
        known = OFFICIAL.get(git_blob_sha1(data))
        same = f"identical to the official {known.file}" if known else \
            f"not byte-identical to the official {OUTPUTS[split]}"
        print(f"{path}: {text.count(chr(10)):,} images, {n_categories:,} categories; {same}")
    print(f"check them: python tools/check_lists.py --root <folder holding train_val2018/> "
          f"--train {os.path.join(args.out, OUTPUTS['train'])} "
          f"--val {os.path.join(args.out, OUTPUTS['val'])} --num-classes 8142")
    return 0


if __name__ == "__main__":
    sys.exit(main())
