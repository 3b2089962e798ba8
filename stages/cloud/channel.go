package cloud

import (
	"encoding/json"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/time/rate"
)

// outItem is one queued packet. Push packets are shared by every recipient
// and get this connection's delivery sequence written in as they go out;
// replies keep the client's sequence.
type outItem struct {
	pkt  []byte
	op   int32 // a push's operation, which the client's accepts filter
	push bool
}

// Close codes sent to WebSocket clients.
const (
	closeNormal       = 1000
	closeGoingAway    = 1001
	closeProtocol     = 1002
	closeTooBig       = 1009
	closeInternal     = 1011
	closeTryAgain     = 1013
	closeSlowConsumer = 4008
	closeReplaced     = 4009
	closeRateLimited  = 4029
	closeAuthFailed   = 4401
)

// keptQueue is the queue capacity an idle connection keeps, sparing the
// allocation of a new queue for every message of a steady trickle.
const keptQueue = 4

// maxWriteBatch bounds how many packets go out in one write (one op 9
// frame on WebSocket), keeping frames a client must buffer moderate.
const maxWriteBatch = 128

// channel is one authenticated client connection.
//
// It has no writer goroutine while idle: the first packet queued starts
// one, which writes everything pending in as few writes as it can and ends
// when the queue is empty. An idle connection so costs one goroutine (its
// reader) and no queue memory.
type channel struct {
	mid    int64
	key    string
	ip     string
	t      transport
	logger *slog.Logger
	limit  int           // packets queued before the client is a slow consumer
	slow   *atomic.Int64 // the node's count of slow consumers closed
	seq    atomic.Int32

	mu        sync.Mutex // guards everything below
	rooms     []string
	acceptOps map[int32]struct{} // nil accepts every operation
	queue     []outItem
	writing   bool // a flush goroutine owns the write side
	draining  bool // close with 1001 once the queue is written
	closed    bool
	upstream  *rate.Limiter // made on the first upstream message
	wake      func()        // resumes a parked reader; nil when not parking
}

// setWake sets what close calls to resume the connection's parked reader,
// which must see the connection end.
func (c *channel) setWake(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wake = fn
}

func (c *channel) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func newChannel(t transport, sendQueue int, slow *atomic.Int64, logger *slog.Logger) *channel {
	return &channel{t: t, limit: sendQueue, slow: slow, logger: logger}
}

// accepts reports whether the client listens to op.
func (c *channel) accepts(op int32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acceptsLocked(op)
}

func (c *channel) acceptsLocked(op int32) bool {
	if c.acceptOps == nil {
		return true
	}
	_, ok := c.acceptOps[op]
	return ok
}

// setAccepts adds or removes operations. Subscribing on a connection that
// accepted everything narrows it to the listed operations; unsubscribing
// from "everything" leaves it accepting everything.
func (c *channel) setAccepts(ops []int32, add bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.acceptOps == nil {
		if !add {
			return
		}
		c.acceptOps = map[int32]struct{}{}
	}
	for _, op := range ops {
		if add {
			c.acceptOps[op] = struct{}{}
		} else {
			delete(c.acceptOps, op)
		}
	}
}

func (c *channel) roomList() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.rooms)
}

// firstRoom is the room whose online count heartbeats report.
func (c *channel) firstRoom() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.rooms) == 0 {
		return ""
	}
	return c.rooms[0]
}

// push queues the pushed packets the client accepts, together, so that
// they go out in one write; it reports whether any was queued.
func (c *channel) push(items ...outItem) bool {
	return c.enqueue(items, true)
}

// reply queues a reply to the client's own request.
func (c *channel) reply(item outItem) bool {
	return c.enqueue([]outItem{item}, false)
}

// enqueue never blocks: a client whose queue is full is not keeping up and
// is closed, so that it costs nobody else anything.
func (c *channel) enqueue(items []outItem, filter bool) bool {
	c.mu.Lock()
	if c.closed || c.draining {
		c.mu.Unlock()
		return false
	}
	n := len(c.queue)
	for _, it := range items {
		if !filter || c.acceptsLocked(it.op) {
			c.queue = append(c.queue, it)
		}
	}
	if len(c.queue) == n {
		c.mu.Unlock()
		return false
	}
	if len(c.queue) > c.limit {
		c.queue = c.queue[:n]
		c.mu.Unlock()
		c.logger.Info("closing slow consumer", "mid", c.mid, "key", c.key, "queued", c.limit)
		c.slow.Add(1)
		c.close(closeSlowConsumer, "slow consumer")
		return false
	}
	start := !c.writing
	c.writing = true
	c.mu.Unlock()
	if start {
		go c.flush()
	}
	return true
}

// flush writes until the queue is empty, then ends.
func (c *channel) flush() {
	var spare []outItem
	for {
		c.mu.Lock()
		if c.closed || len(c.queue) == 0 {
			c.writing = false
			c.queue = nil
			if !c.closed && cap(spare) <= keptQueue {
				// An idle connection keeps a small queue, never a burst-sized one.
				c.queue = spare
			}
			drained := c.draining && !c.closed
			c.mu.Unlock()
			if drained {
				c.close(closeGoingAway, "server shutting down")
			}
			return
		}
		batch := c.queue
		c.queue = spare
		c.mu.Unlock()

		var err error
		for rest := batch; len(rest) > 0 && err == nil; {
			n := min(len(rest), maxWriteBatch)
			err = c.t.Write(rest[:n], &c.seq)
			rest = rest[n:]
		}
		clear(batch) // drop the references to shared packets
		spare = batch[:0]
		if err != nil {
			c.logger.Debug("write failed", "key", c.key, "err", err)
			c.close(closeNormal, "")
		}
	}
}

// closeAfterFlush closes with 1001 once what is queued has been written;
// nothing new is queued meanwhile.
func (c *channel) closeAfterFlush() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.draining = true
	busy := c.writing
	c.mu.Unlock()
	if !busy {
		c.close(closeGoingAway, "server shutting down")
	}
}

// close ends the connection once, telling the client why. What is still
// queued is dropped. The transport closes in the background: the close
// frame waits behind a write in progress, and the caller may be a push
// holding a bucket lock.
func (c *channel) close(code int, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.queue = nil
	wake := c.wake
	c.mu.Unlock()
	go c.t.Close(code, reason)
	if wake != nil {
		wake()
	}
}

// allowUpstream reports whether the client may send one more upstream
// message under the per-connection rate limit.
func (c *channel) allowUpstream(limit rate.Limit, burst int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.upstream == nil {
		c.upstream = rate.NewLimiter(limit, burst)
	}
	return c.upstream.Allow()
}

// parseOps reads a comma-separated operation list ("1000,1001").
func parseOps(body []byte) ([]int32, bool) {
	var ops []int32
	for f := range strings.SplitSeq(string(body), ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.ParseInt(f, 10, 32)
		if err != nil {
			return nil, false
		}
		ops = append(ops, int32(n))
	}
	return ops, true
}

// authReply is the op 8 body.
type authReply struct {
	Mid       int64    `json:"mid"`
	Key       string   `json:"key"`
	Rooms     []string `json:"rooms"`
	Heartbeat int64    `json:"heartbeat"`
}

func (r authReply) encode() []byte {
	if r.Rooms == nil {
		r.Rooms = []string{}
	}
	b, _ := json.Marshal(r)
	return b
}
