"""DVC stage `prepare`: load (or, for folder datasets, list) the dataset, hold out a seeded
validation split, fingerprint it."""

from pipeline import paths
from pipeline.config import load_params
from pipeline.data import fingerprint, list_folder_dataset, load_dataset, save_splits, split_holdout
from pipeline.entry import stage_main
from pipeline.io import check_writable, replaced_together, write_json


@stage_main
def main() -> None:
    params = load_params(paths.PARAMS)
    check_writable([paths.PREPARED.parent])
    folder = None
    if params.data.is_folder:
        folder = list_folder_dataset(params.data)
        train, test, source, digest = (
            folder.train,
            folder.test,
            str(folder.root),
            folder.fingerprint,
        )
    else:
        train, test, source = load_dataset(params.data, paths.DOWNLOADS)
        digest = fingerprint(train, test)
    train, val, test = split_holdout(train, test, params.data, params.seed)
    info = {
        "dataset": params.data.dataset,
        "source": source,
        "fingerprint": digest,
        "train": len(train),
        "val": len(val),
        "test": len(test),
    }
    if folder is not None:  # train/calibrate/evaluate size the model's classifier from this
        info |= {"root": str(folder.root), "num_classes": len(folder.classes)}
        info["classes"] = folder.classes
    with replaced_together():  # the splits and their description, or neither
        save_splits(paths.PREPARED, {"train": train, "val": val, "test": test})
        write_json(paths.DATASET_INFO, info)
    print(
        f"prepared {params.data.dataset}: {len(train)} train / {len(val)} val / "
        f"{len(test)} test images, fingerprint {digest}"
    )


if __name__ == "__main__":
    main()
