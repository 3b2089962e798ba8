package cloud

import (
	"hash/fnv"
	"sync"
	"time"
)

// bucket is one shard of the node's connections, so that no single lock
// sits on the push path. Rooms are sharded the same way: a room's members
// in this bucket are a set, making join and leave O(1).
type bucket struct {
	mu    sync.RWMutex
	chs   map[string]*channel
	rooms map[string]map[*channel]struct{}
	// Connections logic closed (a newer connection of the key registered
	// on another node) before they took their key here: still in their
	// handshake, between logic's Connect and put. put refuses them.
	tombs     map[tomb]time.Time // → when the entry lapses
	tombOrder []tombEntry        // tombs in the order buried, oldest first
}

// tomb names one connection of a key.
type tomb struct {
	key  string
	conn uint64
}

type tombEntry struct {
	tomb
	lapses time.Time
}

// tombTTL is how long a connection closed before it took its key is
// remembered: the window is one Connect call to logic (logicCallTimeout)
// and the hand-off to the session goroutine; twice that covers a slow one.
const tombTTL = 2 * logicCallTimeout

// maxTombs bounds the remembered connections per bucket (32 buckets by
// default: 65,536 entries, under 16 MB with 128-byte keys). Only logic
// buries, once per key that moved to another node while its connection
// here was gone or not yet in; past the bound the oldest is forgotten,
// and that connection, if it still comes, stays open as before.
const maxTombs = 2048

func newBuckets(n int) []*bucket {
	bs := make([]*bucket, n)
	for i := range bs {
		bs[i] = &bucket{chs: map[string]*channel{}, rooms: map[string]map[*channel]struct{}{}, tombs: map[tomb]time.Time{}}
	}
	return bs
}

func bucketFor(bs []*bucket, key string) *bucket {
	h := fnv.New32a()
	_, _ = h.Write([]byte(key))
	return bs[h.Sum32()%uint32(len(bs))]
}

// put adds ch, in its rooms, and returns the connection it replaced. A
// connection logic already closed (see closeConn) is not added: buried
// reports it, and the caller closes it. It still takes the key from the
// connection holding it here if that one began its handshake earlier
// (a smaller id): that one registered before it, so it was replaced too
// (a key connected here reconnecting here and on another node at once).
// One that began later may have registered after the other node's
// connection, and is left to logic.
func (b *bucket) put(ch *channel, now time.Time) (old *channel, buried bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old = b.chs[ch.key]
	t := tomb{ch.key, ch.conn}
	if lapses, ok := b.tombs[t]; ok {
		delete(b.tombs, t)
		if now.Before(lapses) {
			if old == nil || old.conn > ch.conn {
				return nil, true
			}
			b.leaveAll(old)
			delete(b.chs, ch.key)
			return old, true
		}
	}
	if old != nil {
		b.leaveAll(old)
	}
	b.chs[ch.key] = ch
	for _, r := range ch.rooms {
		b.join(ch, r)
	}
	return old, false
}

// closeConn returns key's connection conn, for the caller to close, if it
// holds the key here; conn 0 (an older logic, which does not name it) is
// whichever connection holds key. A named connection that does not hold
// the key is buried, atomically with put: it may still be in its
// handshake, and put then refuses it. Closing by key alone closed a newer
// connection of the same key instead, or none, leaving the old one open.
func (b *bucket) closeConn(key string, conn uint64, now time.Time) *channel {
	b.mu.Lock()
	defer b.mu.Unlock()
	ch := b.chs[key]
	if ch != nil && (conn == 0 || ch.conn == conn) {
		return ch
	}
	if conn != 0 {
		b.bury(tomb{key, conn}, now)
	}
	return nil
}

// bury remembers t for tombTTL; the lapsed and those over maxTombs go.
func (b *bucket) bury(t tomb, now time.Time) {
	for len(b.tombOrder) > 0 && (len(b.tombOrder) >= maxTombs || !now.Before(b.tombOrder[0].lapses)) {
		e := b.tombOrder[0]
		b.tombOrder[0] = tombEntry{}
		b.tombOrder = b.tombOrder[1:]
		if b.tombs[e.tomb] == e.lapses {
			delete(b.tombs, e.tomb)
		}
	}
	lapses := now.Add(tombTTL)
	b.tombs[t] = lapses
	b.tombOrder = append(b.tombOrder, tombEntry{t, lapses})
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
