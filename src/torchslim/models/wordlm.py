"""A PTB-style word-level LSTM language model (Zaremba et al. 2014; the model ISS compresses)."""

from __future__ import annotations

from torch import Tensor, nn

State = tuple[Tensor, Tensor]


class WordLM(nn.Module):
    """embedding → dropout → stacked LSTM (sequence first) → dropout → decoder, optionally tied.

    ``forward(tokens (T, B)) → logits (T, B, V)`` starts from a zero state: that is what tracing,
    ``structures`` and ``compact`` see. Truncated BPTT carries the state with :meth:`step`.

    Args:
        vocab_size: ``V``.
        hidden_size: embedding and LSTM width ``H`` (equal, as in the ISS paper's PTB model).
        num_layers: stacked LSTM layers.
        dropout: on the embedding, between LSTM layers and before the decoder.
        tie_weights: the decoder shares the embedding table (Press & Wolf 2017).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 200, num_layers: int = 2, dropout: float = 0.2,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def step(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """``tokens (T, B)``, the previous chunk's state → ``(logits (T, B, V), state)``."""
        out, state = self.lstm(self.drop(self.encoder(tokens)), state)
        return self.decoder(self.drop(out)), state

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (T, B)`` → ``logits (T, B, V)`` from a zero state."""
        out, _ = self.lstm(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(out))
