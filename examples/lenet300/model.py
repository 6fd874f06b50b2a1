"""LeNet-300-100 (LeCun et al. 1998): a 784-300-100-10 fully connected network for MNIST."""

from torch import nn


class LeNet300(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)
        self.relu = nn.ReLU()

    def forward(self, images):
        """images: float32 [B, 784] in [0, 1) -> logits float32 [B, 10]."""
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(images)))))
