"""Single-device LongCat-Flash model code: no knowledge of training, data, distribution or serving."""
