package pipeline

import (
	"strconv"

	"github.com/ThreeDotsLabs/watermill/message"
)

// ShardOf is the push shard, among n, of what must stay in order: a
// stream (RoomStream, UserStream) or, for a guest with no stream, its key.
// It is FNV-1a: every process of a cluster, whatever its version or
// platform, must choose the same shard for the same stream, which rules
// out Go's seeded hashes.
func ShardOf(key string, n int) int {
	if n <= 1 {
		return 0
	}
	h := uint32(2166136261)
	for i := 0; i < len(key); i++ {
		h ^= uint32(key[i])
		h *= 16777619
	}
	return int(h % uint32(n))
}

// shardKey is the metadata that carries a message's shard from where the
// message is built to where it is published (TakeShard), which removes it:
// it never reaches the broker.
const shardKey = "_imcloud_shard"

// SetShard says which push shard msg goes to.
func SetShard(msg *message.Message, shard int) {
	if shard > 0 {
		msg.Metadata.Set(shardKey, strconv.Itoa(shard))
	}
}

// TakeShard returns msg's shard (SetShard; 0 when none was set) and
// removes it from msg's metadata.
func TakeShard(msg *message.Message) int {
	v, ok := msg.Metadata[shardKey]
	if !ok {
		return 0
	}
	delete(msg.Metadata, shardKey)
	n, _ := strconv.Atoi(v) // set by SetShard only
	return n
}
