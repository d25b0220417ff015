"""One process of the init leak test (tests/test_meta.py): `fresh DIR OUT` saves a tiny
BERT to DIR (once), loads it with `from_pretrained` and writes every tensor to OUT;
`leak DIR OUT` first builds a tiny Llama under `distload.init_empty_weights()` — the
first import of transformers' modeling code happens inside the block — then does the
same load."""

import sys

import torch
from transformers import AutoModel, BertConfig, LlamaConfig

mode, folder, out = sys.argv[1:4]
if mode == "fresh":
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
else:
    import distload

    assert "transformers.initialization" not in sys.modules, "imported before the block"
    with distload.init_empty_weights():
        AutoModel.from_config(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    assert "transformers.initialization" in sys.modules, "not imported inside the block"
model = AutoModel.from_pretrained(folder)
torch.save({n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}, out)
