package logic

import (
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"imcloud/pipeline/expiring"
	"imcloud/stages/logic/token"
)

// connectLimiter bounds how fast one user connects (logic.connect_rate,
// logic.connect_burst): one valid token reconnecting in a loop made
// 70,122 connections in 20 s, 103% of a core, each a registry write and a
// delete. Users are keyed by mid; guests of mid 0 (insecure-json) share
// that mid, so each is keyed by its key instead and no guest can use up
// another's connects.
type connectLimiter struct {
	limit rate.Limit
	burst int

	mu sync.Mutex // orders a Get with its Put, so a user has one limiter
	// A limiter unused for its refill time is full again, as good as a
	// new one: entries live that long (at most twice), so the map holds
	// only users who connected within the last two refill periods.
	users *expiring.Map[string, *rate.Limiter]
}

// newConnectLimiter returns nil, which allows everything, when perSec is 0.
func newConnectLimiter(perSec float64, burst int) *connectLimiter {
	if perSec <= 0 {
		return nil
	}
	burst = max(burst, 1)
	refill := max(time.Duration(float64(burst)/perSec*float64(time.Second)), time.Second)
	return &connectLimiter{limit: rate.Limit(perSec), burst: burst, users: expiring.New[string, *rate.Limiter](refill)}
}

// allow takes one connect of the user id names.
func (l *connectLimiter) allow(id token.Identity) bool {
	// A guest whose key was made up for it has nothing to be limited by
	// (in insecure-json mode mid and key are whatever the client claims
	// anyway); an entry for it would only take memory.
	if l == nil || (id.Mid == 0 && id.KeyMade) {
		return true
	}
	user := "mid:" + strconv.FormatInt(id.Mid, 10)
	if id.Mid == 0 {
		user = "key:" + id.Key
	}
	l.mu.Lock()
	lim, ok := l.users.Get(user)
	if !ok {
		lim = rate.NewLimiter(l.limit, l.burst)
	}
	// Put again on every connect: the entry lives a refill time past the
	// user's last connect, not its first.
	l.users.Put(user, lim)
	l.mu.Unlock()
	return lim.Allow()
}
