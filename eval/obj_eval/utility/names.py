"""The utility study's named choices (presets, recipes, scores), apart from the modules that use them, so that
the command line (`medgen utility --help`, `medgen evaluate --help`) is built without importing torch."""

# features of the BasicUNet levels / ResNet widths and layers, and each preset's budget
PRESETS = {
    "tiny": {"unet": (8, 8, 16, 32, 64, 8), "layers": (1, 1, 1, 1), "planes": (8, 16, 32, 64), "max_steps": 300,
             "batch_size": 32, "lr": 1e-2, "val_every": 50},
    "small": {"unet": (16, 16, 32, 64, 128, 16), "layers": (2, 2, 2, 2), "planes": (32, 64, 128, 256),
              "max_steps": 3000, "batch_size": 32, "lr": 1e-3, "val_every": 200},
    "full": {"unet": (32, 32, 64, 128, 256, 32), "layers": (2, 2, 2, 2), "planes": (64, 128, 256, 512),
             "max_steps": 10000, "batch_size": 64, "lr": 1e-3, "val_every": 500},
}

RECIPE_KINDS = ("real", "real+synthetic", "synthetic", "real+balanced", "real+inpainted")
SEG_METRICS = ("dice_subject", "dice_slice", "hd95_slice")
SEG_METRICS_3D = ("dice_subject", "hd95_volume")     # volumes: one item per subject, HD95 in mm
CLASS_METRICS = ("balanced_accuracy", "accuracy", "auc_macro_ovr", "kappa_quadratic")
CORRECTIONS = ("holm", "none")   # family-wise error control over a study's comparisons (study.correct_family)
