package logic

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"imcloud/pipeline"
	"imcloud/proto/wire"
)

// Bounds of GET /im/history.
const (
	// historyDefaultLimit is the entries a request gets without limit.
	historyDefaultLimit = 100
	// historyMaxLimit bounds limit: 1,000 entries of at most
	// logic.max_message_bytes (4 KB) are a reply of about 4 MB (up to
	// 8 MB as base64), read from the store in one call.
	historyMaxLimit = 1000
)

// historyReply is the data of a GET /im/history answer.
type historyReply struct {
	Stream string `json:"stream"`
	// Top is the stream's epoch and last position now.
	Top Position `json:"top"`
	// Entries are the messages after the asked position, oldest first.
	Entries []historyEntry `json:"entries"`
	// More says the stream has entries after Last: ask again after it.
	More bool `json:"more"`
	// Last is the last position this answer covers (the asked one when
	// it covers none). Positions of pushes that were answered 503 (never
	// accepted) are left out of Entries, so Last may be past the last
	// entry given: ask again after Last, not after that entry.
	Last uint64 `json:"last"`
	// Unrecoverable, when set, says why no entry is given and the caller
	// must resync from Top: "epoch" (the stream's history was lost since
	// the position was given, or it is of another stream), "trimmed"
	// (entries after it are no longer kept) or "future" (past Top).
	Unrecoverable string `json:"unrecoverable,omitempty"`
}

// historyEntry is one message of a stream as the API shows it: its body
// is msg when it is valid UTF-8 (a JSON or text message reads as itself),
// else msg_base64 (standard base64); exactly one of the two is present.
type historyEntry struct {
	Pos       uint64    `json:"pos"`
	ID        string    `json:"msg_id"`
	Operation int32     `json:"operation"`
	At        time.Time `json:"at"`
	Msg       *string   `json:"msg,omitempty"`
	MsgBase64 []byte    `json:"msg_base64,omitempty"`
}

// historyRequest is a validated GET /im/history.
type historyRequest struct {
	stream, epoch string
	after         uint64
	limit         int
}

// parseStream checks a stream name: "room:" and a room a client may join,
// or "user:" and a user id of at least 1 written plainly (guests of mid 0
// have no stream).
func parseStream(s string) error {
	if strings.TrimSpace(s) == "" {
		return badParam("stream", "required")
	}
	if room, ok := pipeline.StreamRoom(s); ok {
		if err := wire.ValidRoom(room); err != nil {
			return wireError("stream", err)
		}
		return nil
	}
	if mid, ok := pipeline.StreamMid(s); ok && mid >= 1 && pipeline.UserStream(mid) == s {
		return nil
	}
	return badParam("stream", "want room:<type://id> or user:<mid of at least 1>, got %s", echo(s))
}

func readHistoryRequest(p *params) (historyRequest, error) {
	var q historyRequest
	var err error
	if q.stream, err = p.string("stream"); err != nil {
		return q, err
	}
	if err := parseStream(q.stream); err != nil {
		return q, err
	}
	if p.has("after") {
		s, _ := p.string("after")
		if q.after, err = strconv.ParseUint(strings.TrimSpace(s), 10, 64); err != nil || q.after > wire.MaxPos {
			return q, badParam("after", "want a position from 0 to %d, got %s", uint64(wire.MaxPos), echo(s))
		}
	}
	if q.epoch, err = p.string("epoch"); err != nil {
		return q, err
	}
	if q.epoch != "" {
		if err := wire.ValidEpoch(q.epoch); err != nil {
			return q, wireError("epoch", err)
		}
	} else if q.after > 0 {
		// A position means nothing without its epoch.
		return q, badParam("epoch", "required when after is above 0")
	}
	q.limit = historyDefaultLimit
	if p.has("limit") {
		n, err := p.int("limit", 32, 1, historyMaxLimit)
		if err != nil {
			return q, err
		}
		q.limit = int(n)
	}
	return q, nil
}

// historyRoute answers GET /im/history (and /goim/history) with a
// stream's messages after a position.
func (st *Stage) historyRoute(a api) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := getParams(r)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		q, err := readHistoryRequest(p)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		if st.history == nil {
			// Not a dependency that is down: this logic keeps none.
			writeError(w, http.StatusNotImplemented, "history is not kept by this logic (no history store)")
			return
		}
		ctx := r.Context()
		if st.cfg.WriteTimeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, st.cfg.WriteTimeout*pushShare/100)
			defer cancel()
		}
		entries, top, err := st.history.Since(ctx, q.stream, q.epoch, q.after, q.limit)
		out := historyReply{Stream: q.stream, Top: Position{Stream: q.stream, Epoch: top.Epoch, Pos: top.Pos}, Entries: []historyEntry{}}
		reason, known := unrecoverable(err, st.pusher.limit, q.stream)
		switch {
		case known:
			out.Unrecoverable = reason
		case err != nil:
			st.logFailure(ctx, "read history", "route", r.URL.Path, "stream", q.stream, "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "history unavailable, retry later")
			return
		default:
			entries = entries[:min(len(entries), q.limit)]
			out.Last = q.after
			if q.epoch == "" && q.after == 0 && len(entries) > 0 {
				out.Last = entries[0].Pos - 1
			}
			for _, e := range entries {
				out.Last = e.Pos
				if e.Void {
					continue // never accepted: nothing to show
				}
				he := historyEntry{Pos: e.Pos, ID: e.ID, Operation: e.Op, At: e.At.UTC()}
				if utf8.Valid(e.Body) {
					s := string(e.Body)
					he.Msg = &s
				} else {
					he.MsgBase64 = e.Body
				}
				out.Entries = append(out.Entries, he)
			}
			out.More = len(entries) > 0 && out.Last < top.Pos
		}
		writeJSON(w, http.StatusOK, reply{Code: 0, Message: a.okMessage(), Data: out})
	})
}
