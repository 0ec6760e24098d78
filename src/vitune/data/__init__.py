"""Training data: LLaVA JSON/JSONL and messages JSONL records, checked, tokenized, batched.

`records` reads and validates records, `dataset` prepares them (token budget, quarantine) and
loads images lazily, `collate` pads batches, `sampler` groups them by modality and length.
"""

from vitune.data.collate import Collator
from vitune.data.dataset import PreparedData, Quarantine, SupervisedDataset, prepare_data, truncate_sample
from vitune.data.records import RecordError, check_record, read_records
from vitune.data.sampler import plan_epoch

__all__ = ["Collator", "PreparedData", "Quarantine", "RecordError", "SupervisedDataset", "check_record", "plan_epoch",
           "prepare_data", "read_records", "truncate_sample"]
