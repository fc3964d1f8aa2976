"""Datasets: the embedded synthetic expression set and loaders for RAF-DB, AffectNet, FER2013, ImageFolder, CSV.

Datasets are registered by name (`register_dataset(DatasetSource(...))`, `list_datasets()`).
Entry point: `build_datasets(name, root, image_size, seed, landmarks, cache_dir, augment, **kwargs)`
-> {"train"|"val"|"test": FERDataset}; each item is (image, label, au_map, has_landmarks).
All labels use the project's order `fer_lib.faces.au.EXPRESSIONS` (tables in `loaders`).
"""
from fer_lib.data.dataset import (DATASETS, IMAGENET_MEAN, IMAGENET_STD, LANDMARK_MODES, AugmentConfig, DatasetSource,
                      FERDataset, dataset_ceiling, dataset_source, list_datasets, register_dataset,
                      attach_detected_landmarks, build_datasets, geometric_transform, landmark_error_report,
                      landmark_nme, load_index, validate_records)
from fer_lib.data.loaders import (AFFECTNET_LABELS, COMPOUND_EXPRESSIONS, EXPRESSIONS_8, FER2013_LABELS, RAFDB_BASIC_LABELS,
                      RAFDB_COMPOUND_LABELS, SYNONYMS, DatasetIndex, DatasetLayoutError, LabelError, Record,
                      canonical_name, load_affectnet, load_csv_manifest, load_fer2013_csv, load_image_folder,
                      load_rafdb, resolve_label)
from fer_lib.data.synthetic import (SPURIOUS_CUES, SyntheticConfig, build_synthetic, generate_sample, load_truth,
                        plot_sample_grid, spurious_cue_present)

__all__ = [
    "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "LANDMARK_MODES", "AugmentConfig", "DatasetSource", "FERDataset",
    "dataset_ceiling", "dataset_source", "list_datasets", "register_dataset",
    "attach_detected_landmarks", "build_datasets", "geometric_transform", "landmark_error_report", "landmark_nme",
    "load_index", "validate_records", "AFFECTNET_LABELS", "COMPOUND_EXPRESSIONS", "EXPRESSIONS_8", "FER2013_LABELS",
    "RAFDB_BASIC_LABELS", "RAFDB_COMPOUND_LABELS", "SYNONYMS", "DatasetIndex", "DatasetLayoutError", "LabelError",
    "Record", "canonical_name", "load_affectnet", "load_csv_manifest", "load_fer2013_csv", "load_image_folder",
    "load_rafdb", "resolve_label", "SPURIOUS_CUES", "SyntheticConfig", "build_synthetic", "generate_sample",
    "load_truth", "plot_sample_grid", "spurious_cue_present",
]
