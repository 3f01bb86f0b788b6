"""LoRA on a Hugging Face BERT (built from a small config: no download), saved in HF PEFT's
format and loaded back by HF PEFT itself, with the same outputs.

    python examples/lora_hf_bert.py
"""
import copy
import tempfile

import torch
from peft import PeftModel as HFPeftModel
from transformers import BertConfig, BertForSequenceClassification

import fastpeft

torch.manual_seed(0)
cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, num_labels=3)
base = BertForSequenceClassification(cfg).eval()
pristine = copy.deepcopy(base)  # get_peft_model adapts `base` in place
ids = torch.randint(0, 1000, (2, 16))

model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
model.print_trainable_parameters()
with torch.no_grad():  # a trained adapter has B != 0; fake a little training
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
ours = model(input_ids=ids).logits

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)  # adapter_config.json + adapter_model.safetensors, PEFT key names
    theirs = HFPeftModel.from_pretrained(pristine, d).eval()(input_ids=ids).logits

print("max |fastpeft - HF PEFT| logits:", (ours - theirs).abs().max().item())
merged = model.merge_and_unload()
print("after merge_and_unload:", type(merged).__name__, "max diff",
      (merged(input_ids=ids).logits - ours).abs().max().item())
