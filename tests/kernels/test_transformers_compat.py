"""Our top-level `kernels` package shares its import name with Hugging Face's `kernels`
(the kernel-hub client) that `transformers` probes for. With ours installed, transformers
must still import, see no hub-kernels package, and run models (README "Troubleshooting" says
what to do on a clash)."""

import subprocess
import sys
import textwrap


def test_transformers_imports_and_runs_with_our_kernels_package():
    code = textwrap.dedent("""
        import kernels, torch, transformers
        from transformers.utils.import_utils import is_kernels_available
        from transformers import AutoConfig, AutoModelForSequenceClassification
        assert hasattr(kernels, "last_token_score"), kernels.__file__  # ours, not the hub client
        assert not is_kernels_available()  # transformers does not mistake ours for the hub client
        cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                                   num_labels=1, pad_token_id=0)
        m = AutoModelForSequenceClassification.from_config(cfg)
        print(m(torch.tensor([[1, 2, 3]])).logits.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 1])" in out.stdout
