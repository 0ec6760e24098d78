"""The synthetic world's tokenizer: byte-level BPE trained on the world's text (`tokenizers`).

Byte-level, so any text (a user's question, a template's markers) encodes without unknowns,
while the world's words and the chat templates' phrases are single tokens. Saved as a
transformers fast tokenizer in two flavours that share one vocabulary:
- the LM's (Llama convention): `<s>` prepended, nothing appended;
- the CLIP text tower's: `<s> ... </s>`, since CLIP pools the text at its end-of-text token.

Ids: `<pad>` 0, `<unk>` 1, `<s>` 2, `</s>` 3. `</s>` is not 2 on purpose: transformers' CLIP text
model treats eos id 2 as the legacy "pool at the largest id" rule.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS)


def train_tokenizer(texts: Iterable[str], vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def as_transformers(tok, add_eos: bool, model_max_length: int):  # -> PreTrainedTokenizerFast
    """Wrap a trained `tokenizers.Tokenizer` with the specials set; `add_eos` for the CLIP flavour."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = copy.deepcopy(tok)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    single = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    pair = f"{BOS} $A {EOS} $B {EOS}" if add_eos else f"{BOS} $A $B"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
