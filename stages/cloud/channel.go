package cloud

import (
	"encoding/json"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// outItem is one queued packet. Push packets are shared by every recipient
// and get this connection's delivery sequence written in as they go out;
// replies keep the client's sequence.
type outItem struct {
	pkt  []byte
	push bool
}

// Close codes sent to WebSocket clients.
const (
	closeNormal       = 1000
	closeGoingAway    = 1001
	closeProtocol     = 1002
	closeTooBig       = 1009
	closeTryAgain     = 1013
	closeSlowConsumer = 4008
	closeReplaced     = 4009
	closeAuthFailed   = 4401
)

// channel is one authenticated client connection.
type channel struct {
	mid    int64
	key    string
	t      transport
	logger *slog.Logger

	out  chan outItem
	done chan struct{}
	once sync.Once

	mu        sync.Mutex
	rooms     []string
	acceptOps map[int32]struct{} // nil accepts every operation

	seq atomic.Int32
}

func newChannel(t transport, sendQueue int, logger *slog.Logger) *channel {
	return &channel{t: t, out: make(chan outItem, sendQueue), done: make(chan struct{}), logger: logger}
}

// accepts reports whether the client listens to op.
func (c *channel) accepts(op int32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
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

// send queues a packet without ever blocking: a client whose queue is full
// is not keeping up and is closed, so it costs nobody else anything.
func (c *channel) send(item outItem) bool {
	select {
	case <-c.done:
		return false
	default:
	}
	select {
	case c.out <- item:
		return true
	default:
		c.logger.Info("closing slow consumer", "mid", c.mid, "key", c.key, "queue", cap(c.out))
		c.close(closeSlowConsumer, "slow consumer")
		return false
	}
}

// close ends the connection once, telling the client why.
func (c *channel) close(code int, reason string) {
	c.once.Do(func() {
		close(c.done)
		c.t.Close(code, reason)
	})
}

// writeLoop drains everything pending into one write until the channel closes.
func (c *channel) writeLoop() {
	batch := make([]outItem, 0, 16)
	for {
		select {
		case <-c.done:
			return
		case item := <-c.out:
			batch = append(batch[:0], item)
		drain:
			for len(batch) < cap(batch)*4 {
				select {
				case item := <-c.out:
					batch = append(batch, item)
				default:
					break drain
				}
			}
			if err := c.t.Write(batch, &c.seq); err != nil {
				c.logger.Debug("write failed", "key", c.key, "err", err)
				c.close(closeNormal, "")
				return
			}
		}
	}
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
