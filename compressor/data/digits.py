"""sklearn's bundled handwritten digits (1,797 real 8×8 images, 10 classes): works offline."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor.data.loaders import DATASETS, DataBundle


def digits_tensors(val_fraction: float = 0.25, seed: int = 0):
    """Stratified split into (x_train, y_train, x_val, y_val); pixels scaled from 0..16 to 0..1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=y.numpy()
    )
    return x_tr, y_tr, x_val, y_val


@DATASETS.register("digits")
def digits(batch_size: int = 64, val_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    x_tr, y_tr, x_val, y_val = digits_tensors(val_fraction, seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=generator)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=256, shuffle=False)
    return DataBundle(train=train, val=val, num_classes=10, description=f"sklearn digits ({len(x_tr)} train / {len(x_val)} val)")
