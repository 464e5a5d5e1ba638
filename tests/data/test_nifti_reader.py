import pickle
import threading

import numpy as np
from monai.data import CacheDataset

from medsegdiff_monai.data import ThreadSafeNibabelReader, load_brats_datalist
from medsegdiff_monai.transforms import get_train_transforms


def _in_thread(function, *args):
    result = []
    worker = threading.Thread(target=lambda: result.append(function(*args)))
    worker.start()
    worker.join()
    return result[0]


def test_get_data_uses_the_files_of_its_own_threads_read(synthetic_datalist, synthetic_brats_dir):
    entry = load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)[0]
    reader = ThreadSafeNibabelReader()
    modalities = reader.read(entry["image"])
    # another thread reads the one-file label in between, as in a threaded CacheDataset fill
    label_array, _ = _in_thread(lambda: reader.get_data(reader.read(entry["label"])))
    image_array, meta = reader.get_data(modalities)

    assert image_array.shape == (4, *label_array.shape)
    assert meta["original_channel_dim"] == 0
    for channel, path in enumerate(entry["image"]):
        np.testing.assert_array_equal(image_array[channel], reader.get_data(reader.read(path))[0])


def test_reader_pickles_and_reads_after_unpickling(synthetic_datalist, synthetic_brats_dir):
    entry = load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)[0]
    reader = ThreadSafeNibabelReader(as_closest_canonical=True)
    copy = pickle.loads(pickle.dumps(reader))

    assert copy.as_closest_canonical and copy.filenames == ()
    np.testing.assert_array_equal(
        copy.get_data(copy.read(entry["image"]))[0], reader.get_data(reader.read(entry["image"]))[0]
    )


def test_threaded_cache_fill_keeps_four_modalities_per_subject(synthetic_datalist, synthetic_brats_dir):
    entries = load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)
    dataset = CacheDataset(
        entries * 4, get_train_transforms(roi_size=(32, 32)), num_workers=4, copy_cache=False, progress=False
    )

    assert [tuple(c["image"].shape)[0] for c in dataset._cache] == [4] * len(entries) * 4
    assert [c["subject_id"] for c in dataset._cache] == [e["subject_id"] for e in entries] * 4
