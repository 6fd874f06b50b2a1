"""LeNet-5, Caffe variant (the model of Deep Compression's Table 1 and Table 3): conv 20@5x5, max-pool 2,
conv 50@5x5, max-pool 2, fully connected 800-500, ReLU, fully connected 500-10. 431,080 parameters
(1,724,320 fp32 bytes).

The built-in ``mnist`` dataset gives flat images, float32 [B, 784] in [0, 1); the model reshapes them
to [B, 1, 28, 28] itself, so the recipe, the artifact's signature and any client keep the flat
[-1, 784] input of LeNet-300-100.
"""

from torch import nn


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)     # [B, 1, 28, 28] -> [B, 20, 24, 24]
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)    # [B, 20, 12, 12] -> [B, 50, 8, 8]
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, images):
        """images: float32 [B, 784] in [0, 1) -> logits float32 [B, 10]."""
        x = images.reshape(-1, 1, 28, 28)
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
