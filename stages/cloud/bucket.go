package cloud

import (
	"hash/fnv"
	"sync"
)

// bucket is one shard of the node's connections, so that no single lock
// sits on the push path. Rooms are sharded the same way: a room's members
// in this bucket are a set, making join and leave O(1).
type bucket struct {
	mu    sync.RWMutex
	chs   map[string]*channel
	rooms map[string]map[*channel]struct{}
}

func newBuckets(n int) []*bucket {
	bs := make([]*bucket, n)
	for i := range bs {
		bs[i] = &bucket{chs: map[string]*channel{}, rooms: map[string]map[*channel]struct{}{}}
	}
	return bs
}

func bucketFor(bs []*bucket, key string) *bucket {
	h := fnv.New32a()
	_, _ = h.Write([]byte(key))
	return bs[h.Sum32()%uint32(len(bs))]
}

// put adds ch, in its rooms, and returns the connection it replaced.
func (b *bucket) put(ch *channel) *channel {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.chs[ch.key]
	if old != nil {
		b.leaveAll(old)
	}
	b.chs[ch.key] = ch
	for _, r := range ch.rooms {
		b.join(ch, r)
	}
	return old
}

// del removes ch and reports whether it was still the key's connection
// (false once a newer connection with the same key replaced it).
func (b *bucket) del(ch *channel) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	current := b.chs[ch.key] == ch
	if current {
		delete(b.chs, ch.key)
		b.leaveAll(ch)
	}
	return current
}

// changeRoom moves ch out of every room and into room (none if empty).
func (b *bucket) changeRoom(ch *channel, room string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.chs[ch.key] != ch {
		return
	}
	b.leaveAll(ch)
	ch.mu.Lock()
	ch.rooms = ch.rooms[:0]
	if room != "" {
		ch.rooms = append(ch.rooms, room)
	}
	ch.mu.Unlock()
	if room != "" {
		b.join(ch, room)
	}
}

func (b *bucket) join(ch *channel, room string) {
	m := b.rooms[room]
	if m == nil {
		m = map[*channel]struct{}{}
		b.rooms[room] = m
	}
	m[ch] = struct{}{}
}

func (b *bucket) leaveAll(ch *channel) {
	ch.mu.Lock()
	rooms := ch.rooms
	ch.mu.Unlock()
	for _, r := range rooms {
		if m := b.rooms[r]; m != nil {
			delete(m, ch)
			if len(m) == 0 {
				delete(b.rooms, r)
			}
		}
	}
}

func (b *bucket) get(key string) *channel {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.chs[key]
}

// roomSend queues the packets to every member of room, each the ones it
// accepts, and counts the members that got any.
func (b *bucket) roomSend(room string, items []outItem) int {
	b.mu.RLock()
	defer b.mu.RUnlock()
	n := 0
	for ch := range b.rooms[room] {
		if ch.push(items...) {
			n++
		}
	}
	return n
}

func (b *bucket) channels(dst []*channel) []*channel {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, ch := range b.chs {
		dst = append(dst, ch)
	}
	return dst
}

// counts adds the bucket's room counts into rooms and its clients' IPs
// into ips, and returns its connection count.
func (b *bucket) counts(rooms map[string]int32, ips map[string]struct{}) int32 {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for r, m := range b.rooms {
		rooms[r] += int32(len(m))
	}
	for _, ch := range b.chs {
		ips[ch.ip] = struct{}{}
	}
	return int32(len(b.chs))
}

func (b *bucket) roomCount(room string) int {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return len(b.rooms[room])
}
