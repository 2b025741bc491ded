"""Recurrent models for ISS (Wen et al., ICLR 2018): a sequence classifier over image rows."""

from __future__ import annotations

from torch import Tensor, nn


class RowLSTM(nn.Module):
    """Sequential Fashion-MNIST: each ``(1, H, W)`` image read as ``H`` time steps of ``W`` pixels.

    ``x (N, 1, H, W)`` → ``(N, H, W)`` → ``nn.LSTM`` (batch first) → the last step's output → ``fc``.

    Args:
        num_classes: outputs of ``fc``.
        input_size: pixels per row ``W`` (28).
        hidden_size, num_layers: of the LSTM.
        dropout: between stacked LSTM layers (PyTorch's ``dropout`` argument).
        per_layer: one single-layer ``nn.LSTM`` per layer (``self.layers``) instead of one stacked
            ``nn.LSTM`` (``self.lstm``), so that ISS compaction gives each layer its own width.
    """

    def __init__(self, num_classes: int = 10, input_size: int = 28, hidden_size: int = 128, num_layers: int = 2,
                 dropout: float = 0.0, per_layer: bool = False) -> None:
        super().__init__()
        if per_layer:
            self.layers = nn.ModuleList(nn.LSTM(input_size if i == 0 else hidden_size, hidden_size, batch_first=True)
                                        for i in range(num_layers))
            self.drop = nn.Dropout(dropout)
        else:
            self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                                dropout=dropout if num_layers > 1 else 0.0)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, 1, H, W)`` → logits ``(N, num_classes)``."""
        out = x.flatten(1, 2)                                    # (N, H, W)
        if hasattr(self, "lstm"):
            out, _ = self.lstm(out)                              # (N, H, hidden)
        else:
            for i, layer in enumerate(self.layers):
                out, _ = layer(out if i == 0 else self.drop(out))
        return self.fc(out[:, -1])
