"""Which offsets may be committed when messages finish out of order.

Per partition, the committable offset is the lowest offset still being worked on; with none open,
one past the highest started. So a crash replays every unfinished message and never skips one.
The tracker refuses to go backwards: an offset below one already started means the consumer was
rewound behind our back, which would make a commit skip work."""

from collections.abc import Iterable
from typing import cast

from confluent_kafka import Message, TopicPartition

Partition = tuple[str, int]  # (topic, partition)


def position(message: Message) -> tuple[Partition, int]:
    """A consumed message's (topic, partition) and offset, which librdkafka sets on every message without an error."""
    return cast(Partition, (message.topic(), message.partition())), cast(int, message.offset())


class OffsetTracker:
    def __init__(self):
        self._epoch: dict[Partition, int] = {}  # how often the partition was forgotten (revoked)
        self._open: dict[Partition, set[int]] = {}
        self._next: dict[Partition, int] = {}  # one past the highest offset started
        self._stored: dict[Partition, int] = {}  # the last offset handed to the consumer to commit
        self._changed: set[Partition] = set()  # partitions with a message finished since committable()

    def start(self, partition: Partition, offset: int) -> int:
        """Mark the message being worked on; return the partition's epoch, which finish() takes back."""
        if offset < self._next.get(partition, offset):
            raise ValueError(f"offset {offset} of {partition} is behind {self._next[partition]}, already started")
        self._open.setdefault(partition, set()).add(offset)
        self._next[partition] = offset + 1
        self._stored.setdefault(partition, offset)  # consuming started there: nothing to commit until past it
        return self._epoch.get(partition, 0)

    def finish(self, partition: Partition, offset: int, epoch: int) -> None:
        """Mark the message done. Work started before the partition was forgotten (revoked, perhaps
        assigned again since) is ignored: its offset may be open again for the new assignment."""
        if epoch == self._epoch.get(partition, 0):
            self._open.get(partition, set()).discard(offset)
            self._changed.add(partition)

    def is_open(self, partition: Partition, offset: int, epoch: int) -> bool:
        return epoch == self._epoch.get(partition, 0) and offset in self._open.get(partition, ())

    def committable(self, partitions: Iterable[Partition] | None = None) -> list[TopicPartition]:
        """The offsets to commit that are past what was last handed out (of the partitions given, or
        of those where a message finished since); marks them as handed out."""
        advanced = []
        if partitions is None:
            partitions, self._changed = self._changed, set()
        for partition in partitions:
            if partition not in self._next:
                continue
            open_offsets = self._open.get(partition)
            offset = min(open_offsets) if open_offsets else self._next[partition]
            if offset > self._stored.get(partition, -1):
                self._stored[partition] = offset
                advanced.append(TopicPartition(*partition, offset))
        return advanced

    def forget(self, partitions: list[Partition]) -> None:
        """Drop what is known of partitions that are no longer ours; their next owner starts from
        the committed offset."""
        for partition in partitions:
            self._changed.discard(partition)
            self._epoch[partition] = self._epoch.get(partition, 0) + 1
            self._open.pop(partition, None)
            self._next.pop(partition, None)
            self._stored.pop(partition, None)
